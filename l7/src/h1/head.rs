//! HTTP/1.x message heads and chunked bodies for the relay, on borrowed bytes.
//!
//! A request head is parsed by httparse into views of the bytes as they came (no header map,
//! no URI object): what the rules need to judge it, how its body is framed, whether the
//! connection stays open, and which of its fields must not be forwarded (hop-by-hop ones and
//! those the Connection field names, one bit each). The framing rules are RFC 9112's, held
//! strictly because a relay that frames a body differently from the upstream is a request
//! smuggling vector (§6.1, §6.3, §11.2): Transfer-Encoding and Content-Length together,
//! differing or invalid Content-Length values, a last transfer coding other than chunked,
//! Transfer-Encoding in HTTP/1.0, more than one Host, obs-fold and bare CR are all refused.
//!
//! A response head is parsed and written for the client in one go: its status line with the
//! client's version, its fields as they came less the hop-by-hop ones, and the framing the
//! client gets (see [`ToClient`]).
//!
//! Chunked bodies are decoded chunk by chunk ([`Chunked`]) and written again in canonical form
//! (size lines without extensions, trailers as `name: value` lines), or as their plain data
//! for an HTTP/1.0 client, or not at all (a denied request's body, skipped).

use std::mem::MaybeUninit;

use crate::http_rules::RequestHeaders;
use http::header::HeaderName;

/// Most fields a head (or a chunked body's trailer section) may have: fits the bit sets.
pub(super) const MAX_HEADERS: usize = 100;
/// Largest request or response head, chunk-size line or trailer section accepted.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Room for the fields of one head.
pub(super) type Slots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

pub(super) fn slots<'b>() -> Slots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// How a request body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyLen {
    None,
    Length(u64),
    Chunked,
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HeadError {
    /// Larger than [`MAX_HEAD`] or with more than [`MAX_HEADERS`] fields: 431.
    TooLarge,
    /// 400, with what was wrong (for the log).
    Bad(&'static str),
}

/// The fields of a parsed head, with the ones not to forward marked.
pub(super) struct Fields<'b> {
    pub list: &'b [httparse::Header<'b>],
    /// One bit per field of `list`: not forwarded.
    pub drop: u128,
    /// One bit per field: not seen by the rules either (an h2c offer, ignored).
    pub hidden: u128,
}

impl RequestHeaders for Fields<'_> {
    fn any_value(&self, name: &HeaderName, each: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        let name = name.as_str().as_bytes();
        self.list.iter().enumerate().any(|(i, f)| {
            self.hidden & (1 << i) == 0
                && f.name.len() == name.len()
                && f.name.as_bytes().eq_ignore_ascii_case(name)
                && each(f.value)
        })
    }
}

/// What the request asks for beyond plain HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upgrade {
    None,
    /// An Upgrade field (other than an h2c offer) or CONNECT: what follows would not be HTTP.
    Wanted,
}

/// A request head, borrowed from the bytes it was parsed from.
pub(super) struct RequestHead<'b> {
    pub method: &'b str,
    /// The request target as sent.
    pub target: &'b str,
    /// The target as the rules see it and the upstream gets it: path and query (for an
    /// absolute-form target its path part, `/` when empty).
    pub path: &'b str,
    /// The authority of an absolute-form target (or of CONNECT's authority form).
    pub authority: Option<&'b str>,
    /// Whether `path` needs a `/` in front to be origin-form (`http://h?q`).
    pub path_needs_slash: bool,
    pub http10: bool,
    pub fields: Fields<'b>,
    /// The Host field (refused unless it is text: visible ASCII, spaces, tabs).
    pub host: Option<&'b str>,
    pub body: BodyLen,
    /// Whether the client keeps the connection open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub upgrade: Upgrade,
    /// The (first) content-type is gRPC's.
    pub grpc: bool,
    /// TE named `trailers` (kept end to end: gRPC needs it).
    pub te_trailers: bool,
    /// Content-Length came repeated or as a list: forwarded as one field with the value.
    pub length_rewrite: bool,
    /// Length of the head in bytes.
    pub len: usize,
}

impl RequestHead<'_> {
    /// The authority the request names: the Host field, else the target's.
    pub fn host(&self) -> &str {
        self.host.or(self.authority).unwrap_or("")
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Safe to send again on a new connection when the first one failed before an answer.
    pub fn idempotent(&self) -> bool {
        matches!(self.method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
    }
}

/// Whether `name` (a field name or Connection option) is `lower` (lowercase letters, digits
/// and `-`) in any case. Setting the 0x20 bit makes an upper-case letter lower case and maps
/// no other byte such a name or option can hold (no CR) onto one of those, so one OR and a
/// compare per byte are exact.
fn is(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.iter().zip(lower).all(|(a, b)| a | 0x20 == *b)
}

/// The field names of one connection (RFC 9110 §7.6.1, and the pre-standard ones still seen).
/// Transfer-Encoding is not here: its framing is checked and forwarded as it came (the body
/// goes on chunked exactly as the field says).
fn is_hop_by_hop(name: &[u8]) -> bool {
    // Decided by the length first: most names have a length no hop-by-hop name has.
    match name.len() {
        2 => is(name, b"te"),
        7 => is(name, b"upgrade"),
        10 => is(name, b"connection") || is(name, b"keep-alive"),
        16 => is(name, b"proxy-connection"),
        18 => is(name, b"proxy-authenticate"),
        19 => is(name, b"proxy-authorization"),
        _ => false,
    }
}

/// A Connection option that must not take a field with it: the framing fields (a relay
/// that dropped Content-Length but sent the body would smuggle it as the next request), and
/// Host (the rules judged it: without it the upstream would pick a virtual host unjudged).
fn is_protected(name: &[u8]) -> bool {
    is(name, b"content-length") || is(name, b"transfer-encoding") || is(name, b"host")
}

/// The bits of fields 0, 1, 2, ... (shifted along: shifting a u128 by a variable costs
/// several steps).
fn bits() -> impl Iterator<Item = u128> {
    std::iter::successors(Some(1u128), |b| Some(b << 1))
}

/// Items of a comma-separated field value, trimmed, empty ones skipped.
fn items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Text of a field value as `HeaderValue::to_str` would give it: httparse lets a value hold
/// only HTAB, SP, visible ASCII and bytes from 0x80, so the value is text when it is ASCII.
fn as_text(value: &[u8]) -> Option<&str> {
    if value.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(value) })
    } else {
        None
    }
}

/// Reads a content-length value into `seen` (the value of an earlier one): every value, and
/// every item of a list, must be the same number.
pub(super) fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, &'static str> {
    let mut length = seen;
    let mut any = false;
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err("invalid content-length");
        }
        let n = item
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length");
        }
        length = Some(n);
        any = true;
    }
    match length {
        Some(n) if any => Ok(n),
        _ => Err("invalid content-length"),
    }
}

/// Connection options naming other fields (rarely any: `close`, `keep-alive` are the usual).
#[derive(Default)]
struct Named<'b>(Vec<&'b [u8]>);

impl<'b> Named<'b> {
    fn add(&mut self, token: &'b [u8]) {
        if !is_hop_by_hop(token) && !is_protected(token) {
            self.0.push(token);
        }
    }

    /// Marks in `drop` the fields of `list` the options name.
    fn mark(&self, list: &[httparse::Header<'_>], drop: &mut u128) {
        if self.0.is_empty() {
            return;
        }
        for (f, bit) in list.iter().zip(bits()) {
            if self
                .0
                .iter()
                .any(|t| f.name.as_bytes().eq_ignore_ascii_case(t))
            {
                *drop |= bit;
            }
        }
    }
}

/// Parses the request head at the start of `buf`: `None` while it is incomplete.
pub(super) fn parse_request<'b>(
    buf: &'b [u8],
    slots: &'b mut Slots<'b>,
) -> Result<Option<RequestHead<'b>>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Bad("unsupported version")),
        Err(_) => return Err(HeadError::Bad("invalid request head")),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Bad("invalid request head"));
    };
    let list: &'b [httparse::Header<'b>] = req.headers;
    let http10 = version == 0;

    let mut drop = 0u128;
    let mut hidden = 0u128;
    let mut named = Named::default();
    let mut close = false;
    let mut keep_alive_option = false;
    let mut host = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut length_fields = 0u128;
    let mut length_rewrite = false;
    let mut te = false;
    let mut te_chunked_last = false;
    let mut te_chunked_before = false;
    let mut te_trailers = false;
    let mut upgrade = false;
    let mut upgrade_only_h2c = true;
    let mut h2c_fields = 0u128;
    let mut expect_continue = false;
    let mut grpc = None;
    for (f, bit) in list.iter().zip(bits()) {
        let name = f.name.as_bytes();
        let value = f.value;
        match name.len() {
            4 if is(name, b"host") => {
                hosts += 1;
                // Judged as text or not at all: the upstream must not get a Host the rules
                // did not see (a target's authority would be judged in its place).
                host = Some(as_text(value).ok_or(HeadError::Bad("host field not text"))?);
            }
            6 if is(name, b"expect") => {
                expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            12 if grpc.is_none() && is(name, b"content-type") => {
                grpc = Some(as_text(value).is_some_and(|v| v.starts_with("application/grpc")));
            }
            14 if is(name, b"content-length") => {
                if length.is_some() || value.contains(&b',') {
                    length_rewrite = true;
                }
                length = Some(content_length(value, length).map_err(HeadError::Bad)?);
                length_fields |= bit;
            }
            14 if is(name, b"http2-settings") => h2c_fields |= bit,
            17 if is(name, b"transfer-encoding") => {
                te = true;
                for coding in items(value) {
                    te_chunked_before |= te_chunked_last;
                    te_chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                }
            }
            _ if is_hop_by_hop(name) => {
                drop |= bit;
                if is(name, b"connection") {
                    for token in items(value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            keep_alive_option = true;
                        }
                        named.add(token);
                    }
                } else if is(name, b"te") {
                    te_trailers |= items(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
                } else if is(name, b"upgrade") {
                    upgrade = true;
                    upgrade_only_h2c &= items(value).all(|p| p.eq_ignore_ascii_case(b"h2c"));
                    h2c_fields |= bit;
                }
            }
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(HeadError::Bad("more than one host field"));
    }
    let body = if te {
        if http10 {
            return Err(HeadError::Bad("transfer-encoding in an HTTP/1.0 request"));
        }
        if length.is_some() {
            return Err(HeadError::Bad("both transfer-encoding and content-length"));
        }
        if !te_chunked_last || te_chunked_before {
            return Err(HeadError::Bad(
                "transfer-encoding not ending in chunked once",
            ));
        }
        BodyLen::Chunked
    } else {
        match length {
            None | Some(0) => BodyLen::None,
            Some(n) => BodyLen::Length(n),
        }
    };
    if length_rewrite {
        drop |= length_fields;
    }
    named.mark(list, &mut drop);
    // An offer to upgrade to h2c (`curl --http2` on http://) may be ignored by the server
    // (RFC 9113 leaves it optional): the offer is dropped and the request served as HTTP/1.1
    // rather than refused as an upgrade.
    let mut wants_upgrade = method == "CONNECT";
    if upgrade {
        if upgrade_only_h2c {
            hidden = h2c_fields;
            drop |= h2c_fields;
        } else {
            wants_upgrade = true;
        }
    }

    let (path, authority, path_needs_slash) = if target.starts_with('/') || target == "*" {
        (target, None, false)
    } else if method == "CONNECT" {
        ("", Some(target), false)
    } else {
        // Absolute form: scheme "://" authority [path-abempty] ["?" query].
        let Some((scheme, rest)) = target.split_once("://") else {
            return Err(HeadError::Bad("invalid request target"));
        };
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(HeadError::Bad("invalid request target"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(HeadError::Bad("invalid request target"));
        }
        match path.as_bytes().first() {
            None => ("/", Some(authority), false),
            Some(b'?') => (path, Some(authority), true),
            _ => (path, Some(authority), false),
        }
    };

    Ok(Some(RequestHead {
        method,
        target,
        path,
        authority,
        path_needs_slash,
        http10,
        fields: Fields { list, drop, hidden },
        host,
        body,
        keep_alive: if http10 {
            keep_alive_option && !close
        } else {
            !close
        },
        expect_continue,
        upgrade: if wants_upgrade {
            Upgrade::Wanted
        } else {
            Upgrade::None
        },
        grpc: grpc.unwrap_or(false),
        te_trailers,
        length_rewrite,
        len,
    }))
}

/// How a response body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RespLen {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// How the body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ToClient {
    /// As framed upstream: nothing, its content-length, or chunks written again as chunks.
    Same,
    /// Close-delimited upstream, chunked to an HTTP/1.1 client (its connection stays open).
    Chunk,
    /// Chunked upstream, plain to an HTTP/1.0 client: the data only, then the close.
    Dechunk,
    /// Close-delimited to an HTTP/1.0 client: as it comes, then the close.
    Raw,
}

/// What the client side of an exchange needs to know to write the response head.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientSide {
    pub http10: bool,
    pub keep_alive: bool,
    pub head_request: bool,
}

/// A final response head, written for the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct ResponseHead {
    pub status: u16,
    pub body: RespLen,
    pub to_client: ToClient,
    /// The upstream connection may take the next request.
    pub upstream_keep_alive: bool,
    /// The client connection stays open after the body.
    pub client_keep_alive: bool,
    pub len: usize,
}

pub(super) enum Response {
    /// Incomplete.
    Partial,
    /// An informational (1xx) head of this length, not forwarded (as before: the client
    /// side writes only the final answer).
    Informational(usize),
    Final(ResponseHead),
}

fn push_status(out: &mut Vec<u8>, http10: bool, code: u16, reason: &str) {
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(super) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends the fields of `list` (parsed from `head`, a whole head) not in `drop`, one line
/// each: runs of kept fields whose lines end in CRLF are copied as they came, others written
/// as `name: value`.
pub(super) fn push_fields(
    out: &mut Vec<u8>,
    head: &[u8],
    list: &[httparse::Header<'_>],
    drop: u128,
) {
    let base = head.as_ptr() as usize;
    let start_of = |f: &httparse::Header<'_>| f.name.as_ptr() as usize - base;
    // Where the last field's line ends: before the empty line.
    let fields_end = if head.ends_with(b"\r\n\r\n") {
        head.len() - 2
    } else {
        0
    };
    let mut run: Option<usize> = None;
    for (i, (f, bit)) in list.iter().zip(bits()).enumerate() {
        let start = start_of(f);
        let end = list.get(i + 1).map_or(fields_end, start_of);
        let crlf = end >= start + 2 && head[end - 2] == b'\r' && head[end - 1] == b'\n';
        let dropped = drop & bit != 0;
        if dropped || !crlf {
            if let Some(from) = run.take() {
                out.extend_from_slice(&head[from..start]);
            }
            if !dropped {
                push_field(out, f.name.as_bytes(), f.value);
            }
        } else if run.is_none() {
            run = Some(start);
        }
    }
    if let Some(from) = run {
        out.extend_from_slice(&head[from..fields_end]);
    }
}

pub(super) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub(super) fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Parses the response head at the start of `buf` and, for a final one, appends the head
/// the client gets to `out`. The hop-by-hop fields (and those the Connection field names)
/// are left out; the framing towards the client is the upstream's when the client can take
/// it (see [`ToClient`]).
pub(super) fn parse_response(
    buf: &[u8],
    client: ClientSide,
    out: &mut Vec<u8>,
) -> Result<Response, &'static str> {
    let mut slots = slots();
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err("response head too large")
        }
        Ok(httparse::Status::Partial) => return Ok(Response::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err("too many header fields"),
        Err(_) => return Err("invalid response head"),
    };
    let code = resp.code.unwrap_or(0);
    if !(100..=999).contains(&code) {
        return Err("invalid status code");
    }
    if code < 200 {
        if code == 101 {
            return Err("switching protocols unasked");
        }
        return Ok(Response::Informational(len));
    }
    let http10 = resp.version == Some(0);
    let list = &*resp.headers;
    let mut drop = 0u128;
    let mut named = Named::default();
    let mut close = false;
    let mut keep_alive_option = false;
    let mut te: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut length_fields = 0u128;
    let mut length_rewrite = false;
    for (f, bit) in list.iter().zip(bits()) {
        let name = f.name.as_bytes();
        match name.len() {
            14 if is(name, b"content-length") => {
                if length.is_some() || f.value.contains(&b',') {
                    length_rewrite = true;
                }
                length = Some(content_length(f.value, length)?);
                length_fields |= bit;
            }
            17 if is(name, b"transfer-encoding") => {
                // The last coding of the last field counts.
                if let Some(last) = items(f.value).last() {
                    te = Some(last.eq_ignore_ascii_case(b"chunked"));
                }
                drop |= bit;
            }
            _ if is_hop_by_hop(name) => {
                drop |= bit;
                if is(name, b"connection") {
                    for token in items(f.value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            keep_alive_option = true;
                        }
                        named.add(token);
                    }
                }
            }
            _ => {}
        }
    }
    named.mark(list, &mut drop);
    let mut upstream_keep_alive = if http10 {
        keep_alive_option && !close
    } else {
        !close
    };
    let no_body = client.head_request || code == 204 || code == 304;
    let body = if no_body {
        RespLen::None
    } else if let Some(chunked) = te {
        // A transfer coding overrides any content-length (which then must not reach the
        // client); a connection that carried both is not trusted further.
        if length.is_some() {
            upstream_keep_alive = false;
            drop |= length_fields;
            length_rewrite = false;
        }
        if chunked {
            RespLen::Chunked
        } else {
            RespLen::Close
        }
    } else {
        match length {
            Some(n) => RespLen::Length(n),
            None => RespLen::Close,
        }
    };
    if body == RespLen::Close {
        upstream_keep_alive = false;
    }
    if length_rewrite {
        drop |= length_fields;
    }
    let to_client = match (body, client.http10) {
        (RespLen::Chunked, true) => ToClient::Dechunk,
        (RespLen::Close, true) => ToClient::Raw,
        (RespLen::Close, false) => ToClient::Chunk,
        _ => ToClient::Same,
    };
    let client_keep_alive =
        client.keep_alive && !matches!(to_client, ToClient::Dechunk | ToClient::Raw);

    out.reserve(len + 64);
    push_status(out, client.http10, code, resp.reason.unwrap_or(""));
    push_fields(out, &buf[..len], list, drop);
    if length_rewrite {
        if let Some(n) = length {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
    }
    if matches!(body, RespLen::Chunked | RespLen::Close) && !client.http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if client.http10 && client_keep_alive {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    } else if !client.http10 && !client_keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Response::Final(ResponseHead {
        status: code,
        body,
        to_client,
        upstream_keep_alive,
        client_keep_alive,
        len,
    }))
}

/// Where a chunked body is in its decoding (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Within a chunk's data, this much left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields (or none) and the final CRLF.
    Trailers,
    Done,
}

/// What becomes of a decoded chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkOut {
    /// Chunked again, canonically.
    Chunks,
    /// The data only.
    Data,
    /// Nothing.
    Skip,
}

/// Decodes what it can of `input` from `state`, writing it per `mode` to `out`: how many
/// bytes of `input` it took. It stops at the end of `input`, at a line not complete in it,
/// or when the body is done.
pub(super) fn decode_chunked(
    state: &mut Chunked,
    input: &[u8],
    mode: ChunkOut,
    out: &mut Vec<u8>,
) -> Result<usize, &'static str> {
    let mut at = 0;
    loop {
        let rest = &input[at..];
        match *state {
            Chunked::Done => return Ok(at),
            Chunked::Size => {
                let Some(lf) = rest.iter().position(|b| *b == b'\n') else {
                    if rest.len() > MAX_CHUNK_LINE {
                        return Err("chunk-size line too long");
                    }
                    return Ok(at);
                };
                if lf == 0 || rest[lf - 1] != b'\r' {
                    return Err("chunk-size line without CRLF");
                }
                let line = &rest[..lf - 1];
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > 15 {
                    return Err("invalid chunk size");
                }
                // After the size: only whitespace and extensions, no control bytes.
                let ext = line[digits..].trim_ascii_start();
                if !(ext.is_empty() || ext[0] == b';')
                    || ext.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
                {
                    return Err("invalid chunk extension");
                }
                let size = line[..digits].iter().fold(0u64, |acc, d| {
                    acc * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
                });
                at += lf + 1;
                if mode == ChunkOut::Chunks {
                    push_hex(out, size);
                    out.extend_from_slice(b"\r\n");
                }
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if rest.is_empty() {
                    return Ok(at);
                }
                let take = left.min(rest.len() as u64) as usize;
                if mode != ChunkOut::Skip {
                    out.extend_from_slice(&rest[..take]);
                }
                at += take;
                *state = if take as u64 == left {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left - take as u64)
                };
            }
            Chunked::DataEnd => {
                if rest.len() < 2 {
                    if rest.first().is_some_and(|b| *b != b'\r') {
                        return Err("chunk data longer than its size");
                    }
                    return Ok(at);
                }
                if &rest[..2] != b"\r\n" {
                    return Err("chunk data longer than its size");
                }
                at += 2;
                if mode == ChunkOut::Chunks {
                    out.extend_from_slice(b"\r\n");
                }
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                if rest.len() < 2 {
                    return Ok(at);
                }
                if rest.starts_with(b"\r\n") {
                    at += 2;
                    if mode == ChunkOut::Chunks {
                        out.extend_from_slice(b"\r\n");
                    }
                    *state = Chunked::Done;
                    continue;
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(rest, &mut fields) {
                    Ok(httparse::Status::Complete((len, parsed))) => {
                        // The section must end with CRLF as the size lines do.
                        if !rest[..len].ends_with(b"\r\n") {
                            return Err("trailer section without CRLF");
                        }
                        if mode == ChunkOut::Chunks {
                            for f in parsed {
                                push_field(out, f.name.as_bytes(), f.value);
                            }
                            out.extend_from_slice(b"\r\n");
                        }
                        at += len;
                        *state = Chunked::Done;
                    }
                    Ok(httparse::Status::Partial) => {
                        if rest.len() >= MAX_HEAD {
                            return Err("trailer section too large");
                        }
                        return Ok(at);
                    }
                    Err(_) => return Err("invalid trailer section"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path, host, body framing, keep-alive and the names of the fields forwarded.
    type Summary = (String, String, BodyLen, bool, Vec<String>);

    fn request(text: &[u8]) -> Result<Option<Summary>, HeadError> {
        let mut slots = slots();
        let Some(h) = parse_request(text, &mut slots)? else {
            return Ok(None);
        };
        let kept = h
            .fields
            .list
            .iter()
            .enumerate()
            .filter(|(i, _)| h.fields.drop & (1 << i) == 0)
            .map(|(_, f)| f.name.to_ascii_lowercase())
            .collect();
        Ok(Some((
            h.path.to_string(),
            h.host().to_string(),
            h.body,
            h.keep_alive,
            kept,
        )))
    }

    #[test]
    fn request_framing_and_connection() {
        let (path, host, body, ka, kept) =
            request(b"GET /a?b HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(
            (path.as_str(), host.as_str(), body, ka),
            ("/a?b", "h", BodyLen::None, true)
        );
        assert_eq!(kept, ["host", "accept"]);
        let (_, _, body, ..) = request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(body, BodyLen::Length(5));
        let (_, _, body, ..) =
            request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(body, BodyLen::Chunked);
        let (.., ka, _) = request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!ka);
        let (.., ka, _) = request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(ka);
        let (.., ka, kept) = request(
            b"GET / HTTP/1.1\r\nConnection: close, X-Hop, content-length\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: b\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!ka);
        assert_eq!(kept, ["x-end", "content-length"]);
        // Absolute form.
        let (path, host, ..) = request(b"GET http://example.com:8080/p?q HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((path.as_str(), host.as_str()), ("/p?q", "example.com:8080"));
        let (path, ..) = request(b"GET http://example.com HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(path, "/");
        assert!(request(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    #[test]
    fn requests_that_could_be_smuggled_are_refused() {
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            // obs-fold, bare CR, a space before the colon.
            b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\rX-A: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A : a\r\n\r\n",
            b"GET nothost HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(HeadError::Bad(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let (_, _, body, ..) =
            request(b"POST / HTTP/1.1\r\nContent-Length: 4, 4\r\ncontent-length: 4\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(body, BodyLen::Length(4));
    }

    #[test]
    fn connection_cannot_take_the_host_the_rules_judged() {
        let (_, host, _, _, kept) =
            request(b"GET / HTTP/1.1\r\nHost: allowed\r\nConnection: host, x-a\r\nX-A: 1\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(host, "allowed");
        assert_eq!(kept, ["host"]);
    }

    #[test]
    fn oversized_heads_are_too_large() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(request(&big).err(), Some(HeadError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(request(&many).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn h2c_offer_is_hidden_and_dropped() {
        let mut slots = slots();
        let h = parse_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n\r\n",
            &mut slots,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.upgrade, Upgrade::None);
        let name = HeaderName::from_static("upgrade");
        assert!(!h.fields.contains(&name));
        assert_eq!(h.fields.drop, 0b1110);
        let mut slots2 = super::slots();
        let h = parse_request(
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            &mut slots2,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.upgrade, Upgrade::Wanted);
        assert!(h.fields.contains(&name));
    }

    fn response(text: &str, client: ClientSide) -> (ResponseHead, String) {
        let mut out = Vec::new();
        match parse_response(text.as_bytes(), client, &mut out) {
            Ok(Response::Final(h)) => (h, String::from_utf8(out).unwrap()),
            Ok(_) => panic!("not a final head: {text:?}"),
            Err(e) => panic!("{e}: {text:?}"),
        }
    }

    const KEEP: ClientSide = ClientSide {
        http10: false,
        keep_alive: true,
        head_request: false,
    };

    #[test]
    fn response_heads_for_the_client() {
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: x\r\n\r\nok\n",
            KEEP,
        );
        assert_eq!(h.body, RespLen::Length(3));
        assert!(h.upstream_keep_alive && h.client_keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: x\r\n\r\n"
        );
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-End: 2\r\n\r\n",
            KEEP,
        );
        assert_eq!(h.body, RespLen::Chunked);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nX-End: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let (h, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Close\r\n\r\n",
            KEEP,
        );
        assert!(!h.upstream_keep_alive && h.client_keep_alive);
        let (h, _) = response("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", KEEP);
        assert!(!h.upstream_keep_alive);
        let (h, _) = response(
            "HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",
            KEEP,
        );
        assert!(h.upstream_keep_alive);
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
            KEEP,
        );
        assert_eq!(h.body, RespLen::Chunked);
        assert!(!h.upstream_keep_alive);
        assert!(!out.to_ascii_lowercase().contains("content-length"));
        let (h, out) = response("HTTP/1.1 200 OK\r\n\r\n", KEEP);
        assert_eq!((h.body, h.to_client), (RespLen::Close, ToClient::Chunk));
        assert!(!h.upstream_keep_alive && h.client_keep_alive);
        assert!(out.contains("transfer-encoding: chunked"));
        let (h, _) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", KEEP);
        assert_eq!(h.body, RespLen::Close);
        let (h, _) = response("HTTP/1.1 204 No Content\r\n\r\n", KEEP);
        assert_eq!(h.body, RespLen::None);
        let (h, out) = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            KEEP,
        );
        assert_eq!(h.body, RespLen::None);
        assert!(out.contains("Content-Length: 10"));
        let head = ClientSide {
            head_request: true,
            ..KEEP
        };
        let (h, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head);
        assert_eq!(h.body, RespLen::None);
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\ncontent-length: 4\r\n\r\n",
            KEEP,
        );
        assert_eq!(h.body, RespLen::Length(4));
        assert_eq!(out, "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n");
        // An HTTP/1.0 client: its version, no chunks, kept alive only when it can be.
        let old = ClientSide {
            http10: true,
            ..KEEP
        };
        let (h, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", old);
        assert!(h.client_keep_alive);
        assert_eq!(
            out,
            "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\n"
        );
        let (h, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", old);
        assert_eq!(h.to_client, ToClient::Dechunk);
        assert!(!h.client_keep_alive);
        assert_eq!(out, "HTTP/1.0 200 OK\r\n\r\n");
        let (h, _) = response("HTTP/1.1 200 OK\r\n\r\n", old);
        assert_eq!(h.to_client, ToClient::Raw);
        // A client that closes: told so.
        let closing = ClientSide {
            keep_alive: false,
            ..KEEP
        };
        let (_, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", closing);
        assert!(out.ends_with("connection: close\r\n\r\n"));
    }

    #[test]
    fn informational_and_malformed_response_heads() {
        let mut out = Vec::new();
        let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
        assert!(matches!(
            parse_response(text, KEEP, &mut out),
            Ok(Response::Informational(25))
        ));
        assert!(out.is_empty());
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", KEEP, &mut out),
            Ok(Response::Partial)
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\x01b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n",
            "NOTHTTP\r\n\r\n",
        ] {
            assert!(
                parse_response(bad.as_bytes(), KEEP, &mut out).is_err(),
                "{bad:?}"
            );
        }
    }

    fn decode_all(input: &[u8], split: usize, mode: ChunkOut) -> Result<Vec<u8>, &'static str> {
        let mut state = Chunked::Size;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        while state != Chunked::Done {
            if fed == input.len() {
                return Err("input ended");
            }
            let end = (fed + split).min(input.len());
            buf.extend_from_slice(&input[fed..end]);
            fed = end;
            let took = decode_chunked(&mut state, &buf, mode, &mut out)?;
            buf.drain(..took);
        }
        assert!(buf.is_empty() && fed == input.len(), "left over");
        Ok(out)
    }

    #[test]
    fn chunked_bodies_decode_however_they_arrive() {
        let input = b"5\r\nhello\r\n1;ext=1\r\n \r\n00A\r\n0123456789\r\n0\r\n\r\n";
        for split in [1, 2, 3, 7, input.len()] {
            let data = decode_all(input, split, ChunkOut::Data).unwrap();
            assert_eq!(data, b"hello 0123456789", "{split}");
            let chunks = decode_all(input, split, ChunkOut::Chunks).unwrap();
            assert_eq!(
                chunks, b"5\r\nhello\r\n1\r\n \r\na\r\n0123456789\r\n0\r\n\r\n",
                "{split}"
            );
            assert!(decode_all(input, split, ChunkOut::Skip).unwrap().is_empty());
        }
        let chunks = decode_all(
            b"2\r\nok\r\n0\r\nx-sum: 1\r\nx-b:2\r\n\r\n",
            4,
            ChunkOut::Chunks,
        )
        .unwrap();
        assert_eq!(chunks, b"2\r\nok\r\n0\r\nx-sum: 1\r\nx-b: 2\r\n\r\n");
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhello!\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0\r\nx-a: 1\n\n",
            b"0\r\nx-a: 1\r\n b\r\n\r\n",
        ] {
            assert!(
                decode_all(bad, 64, ChunkOut::Chunks).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
