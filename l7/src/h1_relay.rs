//! HTTP/1.x client connections, relayed by our own code: one task per client connection
//! owning it and its upstream connection, request and response heads parsed into views of
//! the bytes as they came and forwarded mostly as those bytes, bodies relayed by their framing.
//!
//! Why our own: serving HTTP/1.1 with hyper's server cost 19.5k instructions per request
//! relayed to nginx (`bench/l7/instructions.sh`), spread over hyper's dispatcher, building a
//! header map for every request and response (a name and a value object per field, copies of
//! both), URI objects, and handing each request and its body between hyper's state machines
//! and ours. Here a head is parsed once by httparse into slices of the read buffer, judged on
//! them ([`crate::HttpPolicy::check_parts`]), and the head for the other side written from
//! them in one pass (runs of fields copied as they came); each side's buffer lives as long
//! as the connection. 9.7k instructions per request on the same benchmark, about 2.1k of them
//! httparse's and 2.5k tokio's. In time (wrk -c32 through the proxy with 20 rules to nginx,
//! all on 2 cores, 10 interleaved rounds) the proxy's CPU per request went from 12.7 to
//! 10.6 us (user space 3.9 to 2.2 us; the rest is the kernel's sockets and wake-ups) and its
//! requests per second from 0.99x to 1.09x those of nginx as a reverse proxy (median of the
//! rounds' ratios), p99 latency 0.58x nginx's.
//!
//! The parts: `head` parses and checks heads (RFC 9112's framing rules, held strictly against
//! request smuggling) and decodes chunked bodies; `relay` is the connection's loop.

#[path = "h1/head.rs"]
mod head;
#[path = "h1/relay.rs"]
mod relay;

pub(super) use relay::serve;
