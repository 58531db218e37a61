//! HTTP/2 framing (RFC 9113 §4, §6): a reader that checks each frame as the protocol
//! requires of any endpoint (sizes, stream ids, padding, CONTINUATION runs, the preface) and
//! hands the relay what it needs, and writers for the frames the relay sends.

/// Frame types.
pub(crate) const DATA: u8 = 0;
pub(crate) const HEADERS: u8 = 1;
pub(crate) const PRIORITY: u8 = 2;
pub(crate) const RST_STREAM: u8 = 3;
pub(crate) const SETTINGS: u8 = 4;
pub(crate) const PUSH_PROMISE: u8 = 5;
pub(crate) const PING: u8 = 6;
pub(crate) const GOAWAY: u8 = 7;
pub(crate) const WINDOW_UPDATE: u8 = 8;
pub(crate) const CONTINUATION: u8 = 9;

/// Flags.
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

/// Error codes (RFC 9113 §7).
pub(crate) const NO_ERROR: u32 = 0x0;
pub(crate) const PROTOCOL_ERROR: u32 = 0x1;
pub(crate) const INTERNAL_ERROR: u32 = 0x2;
pub(crate) const FLOW_CONTROL_ERROR: u32 = 0x3;
pub(crate) const STREAM_CLOSED: u32 = 0x5;
pub(crate) const FRAME_SIZE_ERROR: u32 = 0x6;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const CANCEL: u32 = 0x8;
pub(crate) const COMPRESSION_ERROR: u32 = 0x9;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Settings (RFC 9113 §6.5.2).
pub(crate) const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub(crate) const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub(crate) const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub(crate) const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub(crate) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub(crate) const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The protocol's defaults and bounds.
pub(crate) const DEFAULT_WINDOW: u32 = 65_535;
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;
pub(crate) const DEFAULT_MAX_FRAME: usize = 16_384;
const MAX_MAX_FRAME: u32 = (1 << 24) - 1;

/// The client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection error: GOAWAY with `code`, then close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnError {
    pub code: u32,
    pub why: &'static str,
}

pub(crate) fn conn_error(code: u32, why: &'static str) -> ConnError {
    ConnError { code, why }
}

/// A frame as the relay sees it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// `data` without padding; `flow` counts the whole payload (flow control includes
    /// padding).
    Data {
        stream: u32,
        data: &'a [u8],
        flow: usize,
        end: bool,
    },
    /// A whole header block (CONTINUATIONs joined). `bad_priority`: it named itself as its
    /// dependency (a stream error once the block is decoded).
    Headers {
        stream: u32,
        block: &'a [u8],
        end: bool,
        bad_priority: bool,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    /// Settings as checked (6-octet pairs with valid values), or an acknowledgement.
    Settings {
        ack: bool,
        params: &'a [u8],
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last: u32,
        code: u32,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    /// A stream error found in the framing alone.
    StreamError {
        stream: u32,
        code: u32,
    },
    /// Nothing for the relay: PRIORITY, unknown types, a HEADERS frame whose block goes on
    /// in CONTINUATION.
    Skip,
}

/// The settings in a checked SETTINGS payload.
pub(crate) fn settings(params: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    params.chunks_exact(6).map(|p| {
        (
            u16::from_be_bytes([p[0], p[1]]),
            u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
        )
    })
}

/// A header block being joined from HEADERS and CONTINUATION frames.
struct Partial {
    stream: u32,
    end: bool,
    bad_priority: bool,
}

/// Reads one peer's frames.
pub(crate) struct Reader {
    /// Expecting the client preface (the server side of a connection).
    preface: bool,
    /// No frame yet: the first must be SETTINGS.
    first: bool,
    /// SETTINGS_MAX_FRAME_SIZE we advertised.
    max_frame: usize,
    /// The most a header block may take before it is decoded.
    max_block: usize,
    partial: Option<Partial>,
    block: Vec<u8>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Reader {
    /// `preface`: whether the peer is a client (which opens with the preface).
    pub(crate) fn new(preface: bool, max_frame: usize, max_block: usize) -> Reader {
        Reader {
            preface,
            first: true,
            max_frame,
            max_block,
            partial: None,
            block: Vec::new(),
        }
    }

    /// The next frame at the start of `buf` and how many octets it took, or `None` when
    /// `buf` does not hold a whole one yet.
    pub(crate) fn next<'a>(
        &'a mut self,
        buf: &'a [u8],
    ) -> Result<Option<(Frame<'a>, usize)>, ConnError> {
        if self.preface {
            let n = buf.len().min(PREFACE.len());
            if buf[..n] != PREFACE[..n] {
                return Err(conn_error(PROTOCOL_ERROR, "invalid connection preface"));
            }
            if n < PREFACE.len() {
                return Ok(None);
            }
            self.preface = false;
            return Ok(Some((Frame::Skip, PREFACE.len())));
        }
        if buf.len() < 9 {
            return Ok(None);
        }
        let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
        let kind = buf[3];
        let flags = buf[4];
        let stream = be32(&buf[5..9]) & 0x7fff_ffff;
        if len > self.max_frame {
            return Err(conn_error(
                FRAME_SIZE_ERROR,
                "frame larger than SETTINGS_MAX_FRAME_SIZE",
            ));
        }
        if buf.len() < 9 + len {
            return Ok(None);
        }
        let p = &buf[9..9 + len];
        let used = 9 + len;
        if self.first {
            if kind != SETTINGS || flags & ACK != 0 {
                return Err(conn_error(
                    PROTOCOL_ERROR,
                    "the first frame is not SETTINGS",
                ));
            }
            self.first = false;
        }
        if let Some(partial) = &self.partial {
            if kind != CONTINUATION || stream != partial.stream {
                return Err(conn_error(
                    PROTOCOL_ERROR,
                    "expected CONTINUATION of the header block",
                ));
            }
        }
        let frame = match kind {
            DATA => {
                if stream == 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "DATA on stream 0"));
                }
                Frame::Data {
                    stream,
                    data: unpad(flags, p)?,
                    flow: len,
                    end: flags & END_STREAM != 0,
                }
            }
            HEADERS => {
                if stream == 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "HEADERS on stream 0"));
                }
                let mut fragment = unpad(flags, p)?;
                let mut bad_priority = false;
                if flags & PRIORITY_FLAG != 0 {
                    if fragment.len() < 5 {
                        return Err(conn_error(
                            FRAME_SIZE_ERROR,
                            "HEADERS too short for its priority",
                        ));
                    }
                    bad_priority = be32(fragment) & 0x7fff_ffff == stream;
                    fragment = &fragment[5..];
                }
                let end = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    Frame::Headers {
                        stream,
                        block: fragment,
                        end,
                        bad_priority,
                    }
                } else {
                    self.start_block(fragment)?;
                    self.partial = Some(Partial {
                        stream,
                        end,
                        bad_priority,
                    });
                    Frame::Skip
                }
            }
            CONTINUATION => {
                let Some(partial) = &self.partial else {
                    return Err(conn_error(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                let (stream, end, bad_priority) =
                    (partial.stream, partial.end, partial.bad_priority);
                if self.block.len() + p.len() > self.max_block {
                    return Err(conn_error(ENHANCE_YOUR_CALM, "header block too large"));
                }
                self.block.extend_from_slice(p);
                if flags & END_HEADERS != 0 {
                    self.partial = None;
                    Frame::Headers {
                        stream,
                        block: &self.block,
                        end,
                        bad_priority,
                    }
                } else {
                    Frame::Skip
                }
            }
            PRIORITY => {
                if stream == 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if len != 5 {
                    Frame::StreamError {
                        stream,
                        code: FRAME_SIZE_ERROR,
                    }
                } else if be32(p) & 0x7fff_ffff == stream {
                    Frame::StreamError {
                        stream,
                        code: PROTOCOL_ERROR,
                    }
                } else {
                    Frame::Skip
                }
            }
            RST_STREAM => {
                if stream == 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "RST_STREAM on stream 0"));
                }
                if len != 4 {
                    return Err(conn_error(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size"));
                }
                Frame::Reset {
                    stream,
                    code: be32(p),
                }
            }
            SETTINGS => {
                if stream != 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "SETTINGS on a stream"));
                }
                let ack = flags & ACK != 0;
                if ack && len != 0 {
                    return Err(conn_error(FRAME_SIZE_ERROR, "SETTINGS ack with a payload"));
                }
                if !len.is_multiple_of(6) {
                    return Err(conn_error(FRAME_SIZE_ERROR, "SETTINGS of the wrong size"));
                }
                for (id, value) in settings(p) {
                    match id {
                        SETTINGS_ENABLE_PUSH if value > 1 => {
                            return Err(conn_error(PROTOCOL_ERROR, "invalid SETTINGS_ENABLE_PUSH"));
                        }
                        SETTINGS_INITIAL_WINDOW_SIZE if value as i64 > MAX_WINDOW => {
                            return Err(conn_error(
                                FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                            ));
                        }
                        SETTINGS_MAX_FRAME_SIZE
                            if !(DEFAULT_MAX_FRAME as u32..=MAX_MAX_FRAME).contains(&value) =>
                        {
                            return Err(conn_error(
                                PROTOCOL_ERROR,
                                "invalid SETTINGS_MAX_FRAME_SIZE",
                            ));
                        }
                        _ => {}
                    }
                }
                Frame::Settings { ack, params: p }
            }
            PUSH_PROMISE => {
                return Err(conn_error(
                    PROTOCOL_ERROR,
                    "PUSH_PROMISE (push is disabled)",
                ));
            }
            PING => {
                if stream != 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "PING on a stream"));
                }
                if len != 8 {
                    return Err(conn_error(FRAME_SIZE_ERROR, "PING of the wrong size"));
                }
                let mut data = [0; 8];
                data.copy_from_slice(p);
                Frame::Ping {
                    ack: flags & ACK != 0,
                    data,
                }
            }
            GOAWAY => {
                if stream != 0 {
                    return Err(conn_error(PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if len < 8 {
                    return Err(conn_error(FRAME_SIZE_ERROR, "GOAWAY too short"));
                }
                Frame::GoAway {
                    last: be32(p) & 0x7fff_ffff,
                    code: be32(&p[4..]),
                }
            }
            WINDOW_UPDATE => {
                if len != 4 {
                    return Err(conn_error(
                        FRAME_SIZE_ERROR,
                        "WINDOW_UPDATE of the wrong size",
                    ));
                }
                let increment = be32(p) & 0x7fff_ffff;
                if increment == 0 {
                    if stream == 0 {
                        return Err(conn_error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
                    }
                    Frame::StreamError {
                        stream,
                        code: PROTOCOL_ERROR,
                    }
                } else {
                    Frame::WindowUpdate { stream, increment }
                }
            }
            _ => Frame::Skip,
        };
        Ok(Some((frame, used)))
    }

    fn start_block(&mut self, fragment: &[u8]) -> Result<(), ConnError> {
        if fragment.len() > self.max_block {
            return Err(conn_error(ENHANCE_YOUR_CALM, "header block too large"));
        }
        self.block.clear();
        self.block.extend_from_slice(fragment);
        Ok(())
    }
}

/// The payload without its padding (RFC 9113 §6.1).
fn unpad(flags: u8, p: &[u8]) -> Result<&[u8], ConnError> {
    if flags & PADDED == 0 {
        return Ok(p);
    }
    let Some((&pad, rest)) = p.split_first() else {
        return Err(conn_error(
            FRAME_SIZE_ERROR,
            "padded frame without a pad length",
        ));
    };
    if pad as usize > rest.len() {
        return Err(conn_error(
            PROTOCOL_ERROR,
            "padding longer than the payload",
        ));
    }
    Ok(&rest[..rest.len() - pad as usize])
}

/// Appends a frame header.
pub(crate) fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

pub(crate) fn put_settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    put_head(out, params.len() * 6, SETTINGS, 0, 0);
    for (id, value) in params {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub(crate) fn put_settings_ack(out: &mut Vec<u8>) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub(crate) fn put_ping_ack(out: &mut Vec<u8>, data: &[u8; 8]) {
    put_head(out, 8, PING, ACK, 0);
    out.extend_from_slice(data);
}

pub(crate) fn put_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

pub(crate) fn put_reset(out: &mut Vec<u8>, stream: u32, code: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&code.to_be_bytes());
}

pub(crate) fn put_goaway(out: &mut Vec<u8>, last: u32, code: u32, debug: &[u8]) {
    put_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.extend_from_slice(&last.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(debug);
}

/// Appends DATA frames carrying `data` (at most `max_frame` octets each; one empty frame
/// when `data` is empty).
pub(crate) fn put_data(out: &mut Vec<u8>, stream: u32, data: &[u8], end: bool, max_frame: usize) {
    let mut chunks = data.chunks(max_frame).peekable();
    if chunks.peek().is_none() {
        put_head(out, 0, DATA, if end { END_STREAM } else { 0 }, stream);
        return;
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        put_head(
            out,
            c.len(),
            DATA,
            if end && last { END_STREAM } else { 0 },
            stream,
        );
        out.extend_from_slice(c);
    }
}

/// Appends a header block as HEADERS and as many CONTINUATION frames as `max_frame` needs.
pub(crate) fn put_headers(
    out: &mut Vec<u8>,
    stream: u32,
    block: &[u8],
    end: bool,
    max_frame: usize,
) {
    let end_flag = if end { END_STREAM } else { 0 };
    if block.len() <= max_frame {
        put_head(out, block.len(), HEADERS, END_HEADERS | end_flag, stream);
        out.extend_from_slice(block);
        return;
    }
    let mut chunks = block.chunks(max_frame).peekable();
    let mut kind = HEADERS;
    let mut flags = end_flag;
    while let Some(c) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        put_head(out, c.len(), kind, flags, stream);
        out.extend_from_slice(c);
        kind = CONTINUATION;
        flags = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Reader {
        let mut r = Reader::new(false, DEFAULT_MAX_FRAME, 64 * 1024);
        r.first = false;
        r
    }

    fn frame(len: usize, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_head(&mut out, len, kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn one(r: &mut Reader, buf: &[u8]) -> Result<Option<(String, usize)>, ConnError> {
        r.next(buf).map(|o| o.map(|(f, n)| (format!("{f:?}"), n)))
    }

    #[test]
    fn preface_then_settings_first() {
        let mut r = Reader::new(true, DEFAULT_MAX_FRAME, 1024);
        assert_eq!(one(&mut r, &PREFACE[..10]), Ok(None));
        assert_eq!(
            one(&mut r, b"GET / HTTP/1.1\r\n").unwrap_err().code,
            PROTOCOL_ERROR
        );
        assert_eq!(one(&mut r, PREFACE).unwrap().unwrap().1, 24);
        let ping = frame(8, PING, 0, 0, &[0; 8]);
        assert_eq!(one(&mut r, &ping).unwrap_err().code, PROTOCOL_ERROR);
        let mut r = Reader::new(false, DEFAULT_MAX_FRAME, 1024);
        let mut s = Vec::new();
        put_settings(&mut s, &[(SETTINGS_MAX_CONCURRENT_STREAMS, 5)]);
        let (f, n) = r.next(&s).unwrap().unwrap();
        assert_eq!(n, 15);
        let Frame::Settings { ack: false, params } = f else {
            panic!("{f:?}")
        };
        assert_eq!(settings(params).collect::<Vec<_>>(), [(3, 5)]);
        assert_eq!(one(&mut r, &ping).unwrap().unwrap().1, 17);
    }

    #[test]
    fn padding_is_stripped_and_checked() {
        let mut r = reader();
        let f = frame(
            6,
            DATA,
            PADDED | END_STREAM,
            1,
            &[2, b'a', b'b', b'c', 0, 0],
        );
        assert_eq!(
            r.next(&f).unwrap().unwrap().0,
            Frame::Data {
                stream: 1,
                data: b"abc",
                flow: 6,
                end: true
            }
        );
        // Padding as long as what follows the pad length: no data, fine; longer: an error.
        let f = frame(3, DATA, PADDED, 1, &[2, 0, 0]);
        assert!(matches!(
            r.next(&f),
            Ok(Some((Frame::Data { data: b"", .. }, 12)))
        ));
        let f = frame(3, DATA, PADDED, 1, &[3, 0, 0]);
        assert_eq!(one(&mut r, &f).unwrap_err().code, PROTOCOL_ERROR);
        let f = frame(0, HEADERS, PADDED | END_HEADERS, 1, &[]);
        assert_eq!(one(&mut r, &f).unwrap_err().code, FRAME_SIZE_ERROR);
        // HEADERS with padding and priority.
        let f = frame(
            9,
            HEADERS,
            PADDED | PRIORITY_FLAG | END_HEADERS,
            3,
            &[1, 0, 0, 0, 1, 16, 0x82, 0x84, 0],
        );
        assert_eq!(
            r.next(&f).unwrap().unwrap().0,
            Frame::Headers {
                stream: 3,
                block: &[0x82, 0x84],
                end: false,
                bad_priority: false
            }
        );
        let f = frame(
            6,
            HEADERS,
            PRIORITY_FLAG | END_HEADERS,
            3,
            &[0, 0, 0, 3, 16, 0x82],
        );
        assert!(matches!(
            r.next(&f),
            Ok(Some((
                Frame::Headers {
                    bad_priority: true,
                    ..
                },
                _
            )))
        ));
    }

    #[test]
    fn continuation_joins_and_must_follow_on_the_same_stream() {
        let mut r = reader();
        let h = frame(2, HEADERS, END_STREAM, 1, &[0x82, 0x84]);
        assert_eq!(r.next(&h).unwrap().unwrap().0, Frame::Skip);
        let c = frame(1, CONTINUATION, 0, 1, &[0x86]);
        assert_eq!(r.next(&c).unwrap().unwrap().0, Frame::Skip);
        let c = frame(1, CONTINUATION, END_HEADERS, 1, &[0x87]);
        assert_eq!(
            r.next(&c).unwrap().unwrap().0,
            Frame::Headers {
                stream: 1,
                block: &[0x82, 0x84, 0x86, 0x87],
                end: true,
                bad_priority: false
            }
        );
        // On another stream, or another frame in between, or out of the blue.
        let mut r = reader();
        r.next(&h).unwrap();
        let c3 = frame(1, CONTINUATION, END_HEADERS, 3, &[0x86]);
        assert_eq!(one(&mut r, &c3).unwrap_err().code, PROTOCOL_ERROR);
        let mut r = reader();
        r.next(&h).unwrap();
        let ping = frame(8, PING, 0, 0, &[0; 8]);
        assert_eq!(one(&mut r, &ping).unwrap_err().code, PROTOCOL_ERROR);
        let mut r = reader();
        assert_eq!(one(&mut r, &c).unwrap_err().code, PROTOCOL_ERROR);
        // A block growing past the limit.
        let mut r = Reader::new(false, DEFAULT_MAX_FRAME, 3);
        r.first = false;
        r.next(&h).unwrap();
        let c = frame(2, CONTINUATION, 0, 1, &[0x86, 0x86]);
        assert_eq!(one(&mut r, &c).unwrap_err().code, ENHANCE_YOUR_CALM);
    }

    #[test]
    fn sizes_and_stream_ids_are_checked() {
        let mut r = reader();
        let big = frame(DEFAULT_MAX_FRAME + 1, DATA, 0, 1, &[]);
        assert_eq!(one(&mut r, &big).unwrap_err().code, FRAME_SIZE_ERROR);
        // Not all there yet: more octets needed.
        let partial = frame(100, DATA, 0, 1, &[0; 50]);
        assert_eq!(one(&mut r, &partial), Ok(None));
        assert_eq!(one(&mut r, &partial[..5]), Ok(None));
        for (f, code) in [
            (frame(0, DATA, 0, 0, &[]), PROTOCOL_ERROR),
            (frame(0, HEADERS, END_HEADERS, 0, &[]), PROTOCOL_ERROR),
            (frame(3, RST_STREAM, 0, 1, &[0; 3]), FRAME_SIZE_ERROR),
            (frame(4, RST_STREAM, 0, 0, &[0; 4]), PROTOCOL_ERROR),
            (frame(7, PING, 0, 0, &[0; 7]), FRAME_SIZE_ERROR),
            (frame(8, PING, 0, 1, &[0; 8]), PROTOCOL_ERROR),
            (frame(6, SETTINGS, ACK, 0, &[0; 6]), FRAME_SIZE_ERROR),
            (frame(5, SETTINGS, 0, 0, &[0; 5]), FRAME_SIZE_ERROR),
            (frame(0, SETTINGS, 0, 1, &[]), PROTOCOL_ERROR),
            (
                frame(6, SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2]),
                PROTOCOL_ERROR,
            ),
            (
                frame(6, SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
                FLOW_CONTROL_ERROR,
            ),
            (
                frame(6, SETTINGS, 0, 0, &[0, 5, 0, 0, 0x3f, 0xff]),
                PROTOCOL_ERROR,
            ),
            (
                frame(6, SETTINGS, 0, 0, &[0, 5, 1, 0, 0, 0]),
                PROTOCOL_ERROR,
            ),
            (frame(4, WINDOW_UPDATE, 0, 0, &[0; 4]), PROTOCOL_ERROR),
            (frame(3, WINDOW_UPDATE, 0, 1, &[0; 3]), FRAME_SIZE_ERROR),
            (frame(7, GOAWAY, 0, 0, &[0; 7]), FRAME_SIZE_ERROR),
            (
                frame(4, PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
                PROTOCOL_ERROR,
            ),
        ] {
            assert_eq!(one(&mut reader(), &f).unwrap_err().code, code, "{f:?}");
        }
        // Stream-level: a zero increment on a stream, PRIORITY of the wrong size.
        let f = frame(4, WINDOW_UPDATE, 0, 1, &[0; 4]);
        assert_eq!(
            r.next(&f).unwrap().unwrap().0,
            Frame::StreamError {
                stream: 1,
                code: PROTOCOL_ERROR
            }
        );
        let f = frame(4, PRIORITY, 0, 1, &[0; 4]);
        assert_eq!(
            r.next(&f).unwrap().unwrap().0,
            Frame::StreamError {
                stream: 1,
                code: FRAME_SIZE_ERROR
            }
        );
        // Unknown types are skipped.
        let f = frame(3, 0xfa, 0, 0, &[1, 2, 3]);
        assert_eq!(r.next(&f).unwrap().unwrap(), (Frame::Skip, 12));
    }

    #[test]
    fn writers_split_to_the_frame_size() {
        let mut out = Vec::new();
        put_data(&mut out, 1, &[7; 10], true, 4);
        let mut r = Reader::new(false, 4, 1024);
        r.first = false;
        let mut got = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let (f, n) = r.next(&out[pos..]).unwrap().unwrap();
            let Frame::Data { data, end, .. } = f else {
                panic!()
            };
            got.push((data.len(), end));
            pos += n;
        }
        assert_eq!(got, [(4, false), (4, false), (2, true)]);
        out.clear();
        put_headers(&mut out, 5, &[0x82; 9], true, 4);
        let mut pos = 0;
        let mut block = None;
        while pos < out.len() {
            let (f, n) = r.next(&out[pos..]).unwrap().unwrap();
            if let Frame::Headers {
                block: b,
                end,
                stream,
                ..
            } = f
            {
                assert!(end && stream == 5);
                block = Some(b.to_vec());
            }
            pos += n;
        }
        assert_eq!(block.unwrap(), [0x82; 9]);
    }
}
