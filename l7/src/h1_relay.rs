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
//! them in one pass; each side's buffer lives as long as the connection.
//!
//! The parts: `head` parses and checks heads (RFC 9112's framing rules, held strictly against
//! request smuggling) and decodes chunked bodies; `relay` is the connection's loop.

#[path = "h1/head.rs"]
mod head;
#[path = "h1/relay.rs"]
mod relay;

pub(super) use relay::serve;
