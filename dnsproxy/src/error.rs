use std::io;
use std::net::SocketAddr;

/// Errors of the DNS proxy that reach its owner (start-up problems). Per-query problems never
/// surface as errors: they become DNS rcodes, counters and log lines.
#[derive(Debug, thiserror::Error)]
pub enum DnsProxyError {
    #[error("dns: no listen address configured")]
    NoListenAddress,
    #[error("dns: no upstream configured and transparent mode is off: queries could go nowhere")]
    NoUpstream,
    #[error("dns: cannot listen on {transport} {addr}: {source}")]
    Listen {
        transport: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("dns: cannot open an upstream socket: {0}")]
    UpstreamSocket(io::Error),
    #[error("dns: cannot start a UDP shard: {0}")]
    Shard(io::Error),
    #[error("dns: invalid configuration: {0}")]
    Config(String),
}
