//! HTTP/2 client connections (h2c, so gRPC): every stream judged by its head and relayed
//! onto one HTTP/2 connection to the upstream, by a frame-level relay of our own.
//!
//! Why our own: the relay on the `h2` crate (one task per client connection polling its
//! streams in place, one more driving the upstream connection) cost 53.2k instructions per
//! request relayed (`bench/l7/instructions.sh` with PROTO=h2, h2load against nginx), about
//! 36k of them inside `h2`: decoding nginx's response headers into a header map (~12k:
//! Huffman-coded literals), encoding them again for the client (~6k), and per-frame and
//! per-stream bookkeeping across the two connections and their tasks. Here one task owns
//! both sockets and both connections' state, response header blocks are transcoded (each
//! field checked, the strings copied as they came, Huffman-coded values decoded only to be
//! checked), and what each side is sent in one wake-up is written at once: 15.4k
//! instructions per request on the same benchmark. In time (h2load -c16 -m16 against nginx,
//! all on 2 cores) that took the proxy from about 12 to 7.5 us of CPU per request and its
//! requests per second from a median 0.66x to 0.75x of direct (16 interleaved rounds, 1.15x
//! the `h2` relay's): what is left is mostly the kernel's (60% of the proxy's samples, a third of that switching tasks
//! as it sleeps and wakes for each batch), and the load generator's decoding of the Huffman
//! literals now forwarded where the `h2` crate had sent indexed fields.
//!
//! The parts: `frame` reads and checks frames (RFC 9113 §4, §6) and writes ours; `hpack` is
//! the header compression (RFC 7541: a decoder with its dynamic table, the transcoder that
//! makes a peer's block context-free, an encoder that never indexes); `huffman` its string
//! code; `relay` the connection state, streams, flow control and the rules of RFC 9113 §5
//! and §8 for a proxy. Towards the client the relay is the server it expects (our SETTINGS
//! below), towards the upstream a client with push disabled.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;

#[path = "h2/frame.rs"]
mod frame;
#[path = "h2/hpack.rs"]
mod hpack;
#[path = "h2/huffman.rs"]
mod huffman;
#[path = "h2/relay.rs"]
mod relay;

pub(super) use relay::{serve, H2Failure};

// Our settings: towards clients (we serve them) and towards upstreams (we are their client),
// as hyper's HTTP/2 server and client had them before.
/// Each client stream's window, and the client connection's.
const SERVER_STREAM_WINDOW: u32 = 1024 * 1024;
const SERVER_CONN_WINDOW: u32 = 1024 * 1024;
const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Each upstream stream's window, and the upstream connection's.
const CLIENT_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CLIENT_CONN_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams we may reset for a client's protocol errors before the connection goes.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The Date header value for now (the text made once a second per thread).
pub(super) fn date_now() -> HeaderValue {
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
