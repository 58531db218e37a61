//! Kernel events (drops, policy verdicts, audits) read from the ring buffer.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use ebpf_common as c;
use policy::model::Direction;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What happened to the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Drop,
    /// A new connection was allowed.
    PolicyVerdict,
    /// Policy would have dropped it; audit mode let it pass.
    Audit,
}

/// Why a packet was (or would have been) dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None,
    PolicyDeny,
    PolicyDefaultDeny,
    UnknownEndpoint,
    ProxyUnavailable,
    Malformed,
    FragmentUnknown,
    Other(u8),
}

impl Reason {
    fn from_raw(r: u8) -> Reason {
        match r {
            c::REASON_NONE => Reason::None,
            c::REASON_POLICY_DENY => Reason::PolicyDeny,
            c::REASON_POLICY_DEFAULT_DENY => Reason::PolicyDefaultDeny,
            c::REASON_UNKNOWN_ENDPOINT => Reason::UnknownEndpoint,
            c::REASON_PROXY_UNAVAILABLE => Reason::ProxyUnavailable,
            c::REASON_MALFORMED => Reason::Malformed,
            c::REASON_FRAGMENT_UNKNOWN => Reason::FragmentUnknown,
            o => Reason::Other(o),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::None => "none",
            Reason::PolicyDeny => "policy-deny",
            Reason::PolicyDefaultDeny => "policy-default-deny",
            Reason::UnknownEndpoint => "unknown-endpoint",
            Reason::ProxyUnavailable => "proxy-unavailable",
            Reason::Malformed => "malformed",
            Reason::FragmentUnknown => "fragment-unknown",
            Reason::Other(_) => "other",
        }
    }
}

/// The policy entry that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchedEntry {
    /// 0 = the any-identity entry.
    pub identity: u32,
    pub protocol: u8,
    pub port: u16,
    pub prefix_len: u8,
}

/// One decoded kernel event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathEvent {
    pub kind: EventKind,
    pub reason: Reason,
    pub endpoint: u16,
    pub direction: Direction,
    pub ifindex: u32,
    pub remote_identity: u32,
    pub protocol: u8,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    /// Destination port (ICMP: the type).
    pub dst_port: u16,
    pub len: u32,
    pub matched: Option<MatchedEntry>,
    pub proxy_port: u16,
}

pub(crate) fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::from(*a))
    } else {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    }
}

/// Decodes one ring buffer record; `None` for a record of another size (a newer kernel
/// object writing a longer event would be a build mismatch, reported by the caller).
pub fn decode(bytes: &[u8]) -> Option<DatapathEvent> {
    if bytes.len() < std::mem::size_of::<c::Event>() {
        return None;
    }
    // SAFETY: the record holds at least one Event, a plain-old-data #[repr(C)] struct;
    // read_unaligned copes with any alignment.
    let e: c::Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const c::Event) };
    let kind = match e.kind {
        c::EVENT_DROP => EventKind::Drop,
        c::EVENT_POLICY_VERDICT => EventKind::PolicyVerdict,
        c::EVENT_AUDIT => EventKind::Audit,
        _ => return None,
    };
    let matched = (e.match_kind != c::MATCH_NONE).then_some(MatchedEntry {
        identity: e.key_identity,
        protocol: e.key_protocol,
        port: e.key_port,
        prefix_len: e.key_prefix,
    });
    Some(DatapathEvent {
        kind,
        reason: Reason::from_raw(e.reason),
        endpoint: e.endpoint_id,
        direction: if e.direction == c::DIR_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        ifindex: e.ifindex,
        remote_identity: e.remote_identity,
        protocol: e.protocol,
        src: addr(e.family, &e.saddr),
        src_port: e.sport,
        dst: addr(e.family, &e.daddr),
        dst_port: e.dport,
        len: e.len,
        matched,
        proxy_port: e.proxy_port,
    })
}

/// The ring buffer, read asynchronously (one reader per datapath).
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    pub(crate) fn new(ring: RingBuf<MapData>) -> io::Result<EventStream> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as
        // the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(EventStream { ring })
    }

    /// Events already in the buffer, without waiting.
    pub fn drain(&mut self) -> Vec<DatapathEvent> {
        let ring = self.ring.get_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(e) = decode(&item) {
                out.push(e);
            }
        }
        out
    }

    /// Waits for the next batch of events (never empty).
    pub async fn next_batch(&mut self) -> io::Result<Vec<DatapathEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(e) = decode(&item) {
                    out.push(e);
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}
