use std::net::SocketAddr;
use std::time::Duration;

use crate::DnsProxyError;

/// The rcode a denied query gets (`dns.rejectResponseCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RejectCode {
    #[default]
    Refused,
    NameError,
}

/// The proxy's configuration. The agent builds it from `dns:` of its config file; the fields
/// without a config-file key have defaults fit for this machine.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `dns.listen`: UDP and TCP on each.
    pub listen: Vec<SocketAddr>,
    /// `dns.upstreams`: where queries go when their original destination is not known. A query
    /// picks the next one round-robin.
    pub upstreams: Vec<SocketAddr>,
    /// `dns.transparent`: listening sockets get IP_TRANSPARENT and report the original
    /// destination (IP_RECVORIGDSTADDR for UDP, getsockname for TCP); queries are forwarded
    /// there and answered from that address.
    pub transparent: bool,
    /// `dns.rejectResponseCode`.
    pub reject_code: RejectCode,
    /// `dns.minTTL` (seconds): learned TTLs are raised to this.
    pub min_ttl: u32,
    /// `dns.responseMaxDelay`: longest a response is held waiting for the datapath.
    pub response_max_delay: Duration,
    /// `dns.forwardTimeout`: an upstream that has not answered by then gets no more waiting and
    /// the client no reply.
    pub forward_timeout: Duration,
    /// UDP shards: each with one socket of every listen address (bound with SO_REUSEPORT, so
    /// the kernel spreads queries over them) and its own upstream sockets, each socket read by
    /// a thread of its own. Default: the number of cores. Fewer shards batch better (less CPU
    /// per query when the proxy is lightly loaded); more get a larger share of a busy
    /// machine's CPU.
    pub udp_sockets_per_listen: usize,
    /// UDP sockets of the upstream client that queries are multiplexed over (by random ID),
    /// over all shards: each shard gets its share (at least one) per configured upstream
    /// (connected to it) and per address family for other servers. Default: the number of
    /// cores, at least 2: one per shard, as every socket's answers wake a thread of their own
    /// (with two per shard on 2 cores the proxy spent about 8% more CPU per query under
    /// dnsperf, interleaved runs against dnsdist).
    pub upstream_udp_sockets: usize,
    /// A TCP client connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Concurrent TCP client connections over all listeners; more are closed at accept.
    pub tcp_max_connections: usize,
    /// Queries of one TCP connection being worked on at once; reading pauses beyond that.
    pub tcp_max_inflight_per_connection: usize,
    /// SO_MARK on every upstream socket, so the datapath does not redirect the proxy's own
    /// queries back to it.
    pub upstream_mark: Option<u32>,
    /// `dns.realtimePriority`: the UDP receiving threads run at this SCHED_FIFO priority
    /// (1–99) while together they stay within a CPU and datagram-rate budget (see
    /// `priority.rs`); `None`: normal priority. Default 1, the lowest realtime priority:
    /// above every ordinary task, below the kernel's own realtime threads.
    pub realtime_priority: Option<u8>,
}

impl ProxyConfig {
    /// A configuration with the spec's defaults for everything but the addresses.
    pub fn new(listen: Vec<SocketAddr>, upstreams: Vec<SocketAddr>) -> ProxyConfig {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        ProxyConfig {
            listen,
            upstreams,
            transparent: false,
            reject_code: RejectCode::Refused,
            min_ttl: 0,
            response_max_delay: Duration::from_millis(100),
            forward_timeout: Duration::from_secs(10),
            udp_sockets_per_listen: cores,
            upstream_udp_sockets: cores.max(2),
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 1024,
            tcp_max_inflight_per_connection: 64,
            upstream_mark: None,
            realtime_priority: Some(1),
        }
    }

    pub(crate) fn check(&self) -> Result<(), DnsProxyError> {
        if self.listen.is_empty() {
            return Err(DnsProxyError::NoListenAddress);
        }
        if self.upstreams.is_empty() && !self.transparent {
            return Err(DnsProxyError::NoUpstream);
        }
        for (name, v) in [
            ("udpSocketsPerListen", self.udp_sockets_per_listen),
            ("upstreamUdpSockets", self.upstream_udp_sockets),
            ("tcpMaxConnections", self.tcp_max_connections),
            (
                "tcpMaxInflightPerConnection",
                self.tcp_max_inflight_per_connection,
            ),
        ] {
            if v == 0 {
                return Err(DnsProxyError::Config(format!("{name} must be at least 1")));
            }
        }
        if self
            .realtime_priority
            .is_some_and(|p| !(1..=99).contains(&p))
        {
            return Err(DnsProxyError::Config(
                "realtimePriority must be 1 to 99".into(),
            ));
        }
        if self.forward_timeout.is_zero() {
            return Err(DnsProxyError::Config(
                "forwardTimeout must be longer than zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProxyConfig {
        ProxyConfig::new(
            vec!["127.0.0.1:0".parse().unwrap()],
            vec!["127.0.0.1:53".parse().unwrap()],
        )
    }

    fn error(c: &ProxyConfig) -> String {
        c.check().expect_err("an invalid configuration").to_string()
    }

    #[test]
    fn the_defaults_pass_and_each_bad_field_is_named() {
        assert!(config().check().is_ok());
        let mut c = config();
        c.udp_sockets_per_listen = 0;
        assert!(error(&c).contains("udpSocketsPerListen must be at least 1"));
        let mut c = config();
        c.forward_timeout = Duration::ZERO;
        assert!(error(&c).contains("forwardTimeout must be longer than zero"));
        for bad in [0, 100, 255] {
            let mut c = config();
            c.realtime_priority = Some(bad);
            assert!(
                error(&c).contains("realtimePriority must be 1 to 99"),
                "{bad}"
            );
        }
        for good in [None, Some(1), Some(99)] {
            let mut c = config();
            c.realtime_priority = good;
            assert!(c.check().is_ok(), "{good:?}");
        }
    }
}
