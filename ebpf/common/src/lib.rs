//! The map keys and values that fqdnwall's kernel programs and its loader share.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a size assertion, so the kernel
//! object (built for `bpfel-unknown-none` by the nightly toolchain) and the user-side loader
//! (stable, aya) agree on each byte. Padding fields must be zero: several of these types are
//! hash or LPM keys, where a stray byte would make two equal keys differ. Booleans are integer
//! flags. With the `user` feature every type implements `aya::Pod`.
//!
//! Integers are in host byte order except where a name ends in `_be` (network order), which
//! is where an LPM trie compares the bytes most-significant first (ports in policy keys).
#![no_std]

use core::mem::size_of;

/// Map names as they appear in the object and under the pin directory.
pub mod map_names {
    pub const CONFIG: &str = "FW_CONFIG";
    pub const ENDPOINTS: &str = "FW_ENDPOINTS";
    pub const POLICY: &str = "FW_POLICY";
    pub const POLICY_STATS: &str = "FW_POLICY_STATS";
    pub const POLICY_IDS: &str = "FW_POLICY_IDS";
    pub const POLICY_EXACT: &str = "FW_POLICY_EXACT";
    pub const IPCACHE4: &str = "FW_IPCACHE4";
    pub const IPCACHE6: &str = "FW_IPCACHE6";
    pub const IPCACHE4_EXACT: &str = "FW_IPCACHE4_EXACT";
    pub const IPCACHE6_EXACT: &str = "FW_IPCACHE6_EXACT";
    pub const CT: &str = "FW_CT";
    pub const EVENTS: &str = "FW_EVENTS";
    pub const COUNTERS: &str = "FW_COUNTERS";
    /// Every map, in the order the loader reports them.
    pub const ALL: [&str; 13] = [
        CONFIG,
        ENDPOINTS,
        POLICY,
        POLICY_EXACT,
        POLICY_STATS,
        POLICY_IDS,
        IPCACHE4,
        IPCACHE6,
        IPCACHE4_EXACT,
        IPCACHE6_EXACT,
        CT,
        EVENTS,
        COUNTERS,
    ];
}

/// Program names (the functions of the kernel object).
pub mod prog_names {
    /// tc ingress of an endpoint's host-side veth: the endpoint's egress.
    pub const FROM_ENDPOINT: &str = "fw_from_endpoint";
    /// tc egress of an endpoint's host-side veth: the endpoint's ingress.
    pub const TO_ENDPOINT: &str = "fw_to_endpoint";
    /// tc ingress of a host interface: the host's ingress.
    pub const HOST_INGRESS: &str = "fw_host_ingress";
    /// tc egress of a host interface: the host's egress.
    pub const HOST_EGRESS: &str = "fw_host_egress";
}

/// Default capacities; the loader may override each before the maps are created.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const POLICY: u32 = 262_144;
    pub const IPCACHE_LPM: u32 = 262_144;
    pub const IPCACHE_EXACT: u32 = 262_144;
    pub const CT: u32 = 262_144;
    pub const EVENTS_BYTES: u32 = 1 << 22;
}

/// Connection-tracking lifetimes, nanoseconds (Cilium's defaults).
pub mod ct_timeout {
    const S: u64 = 1_000_000_000;
    /// A TCP connection that has not completed its handshake.
    pub const TCP_SYN: u64 = 60 * S;
    /// An established TCP connection, refreshed by every packet.
    pub const TCP_ESTABLISHED: u64 = 21_600 * S;
    /// A TCP connection after FIN in both directions or RST.
    pub const TCP_CLOSE: u64 = 10 * S;
    /// UDP, SCTP and other protocols, refreshed by every packet.
    pub const OTHER: u64 = 60 * S;
    /// ICMP echo and others.
    pub const ICMP: u64 = 60 * S;
}

/// Global settings: one element of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Local DNS proxy port: endpoint TCP and UDP to port 53 that policy allows is steered to
    /// it. 0 = no DNS interception.
    pub dns_proxy_port: u16,
    pub _pad0: u16,
    /// skb mark set on packets steered to a proxy; a policy rule `fwmark M lookup T` with a
    /// local route in T delivers them to the proxy socket.
    pub proxy_mark: u32,
    /// Packets carrying this mark (under `proxy_mark_mask`) come from our proxies: never
    /// steered again.
    pub proxy_out_mark: u32,
    pub proxy_mark_mask: u32,
    /// `CONFIG_FLAG_*`.
    pub flags: u32,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<Config>() == 24);

/// Audit mode for every endpoint: would-be drops pass and are reported.
pub const CONFIG_FLAG_AUDIT: u32 = 1;
/// Emit a policy-verdict event for each new allowed connection (monitor --type policy-verdict).
pub const CONFIG_FLAG_VERDICT_EVENTS: u32 = 2;

/// Endpoint map value, keyed by the ifindex (u32) of the interface the programs run on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint_id: u16,
    /// `EP_FLAG_*`.
    pub flags: u16,
    /// The endpoint's own security identity (the host: 1).
    pub identity: u32,
}
const _: () = assert!(size_of::<EndpointInfo>() == 8);

/// Audit mode for this endpoint.
pub const EP_FLAG_AUDIT: u16 = 1;
/// Ingress policy is enforced (otherwise: everything allowed in, still tracked).
pub const EP_FLAG_ENFORCE_INGRESS: u16 = 2;
/// Egress policy is enforced.
pub const EP_FLAG_ENFORCE_EGRESS: u16 = 4;
/// A host interface (host firewall): no proxy steering.
pub const EP_FLAG_HOST: u16 = 8;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// The data part of a policy LPM key (the trie key is `prefix_len: u32` + this).
///
/// Bytes in trie order: identity (4), endpoint id (2), direction (1), protocol (1), port (2,
/// big endian), padding (2). The prefix always covers everything up to and including the
/// protocol ([`POLICY_PREFIX_FIXED`] bits) plus the port prefix. Protocol 0 (any) is a value
/// like the others, looked up explicitly after the packet's protocol misses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub identity: u32,
    pub endpoint_id: u16,
    pub direction: u8,
    pub protocol: u8,
    pub dport_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

/// Prefix bits of a policy key before the port: identity, endpoint, direction, protocol.
pub const POLICY_PREFIX_FIXED: u32 = 64;
/// Prefix length of an exact-port entry: those live in the `FW_POLICY_EXACT` hash (one probe
/// instead of a trie walk; an exact port is always the longest match of its protocol), the
/// shorter ones in the `FW_POLICY` trie.
pub const POLICY_PREFIX_EXACT: u32 = POLICY_PREFIX_FIXED + 16;

impl PolicyKey {
    /// The key of an entry and its trie prefix length. `port` must have its bits below
    /// `port_prefix` cleared (ICMP: the type in `port`, prefix 16 or 0).
    pub const fn new(
        endpoint_id: u16,
        identity: u32,
        direction: u8,
        protocol: u8,
        port: u16,
        port_prefix: u8,
    ) -> (u32, PolicyKey) {
        (
            POLICY_PREFIX_FIXED + port_prefix as u32,
            PolicyKey {
                identity,
                endpoint_id,
                direction,
                protocol,
                dport_be: port.to_be(),
                _pad: 0,
            },
        )
    }
}

/// Which protocols an identity has policy entries for, per endpoint and direction: lets the
/// programs skip trie lookups that cannot match (most remote identities have no entries of
/// their own). Key of `FW_POLICY_IDS`; the value is a `u32` of [`proto_bit`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyIdKey {
    pub identity: u32,
    pub endpoint_id: u16,
    pub direction: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<PolicyIdKey>() == 8);

/// The presence bit of exact-port entries (prefix 16, kept in the `FW_POLICY_EXACT` hash) of a
/// protocol in `FW_POLICY_IDS`.
#[inline(always)]
pub const fn exact_bit(protocol: u8) -> u32 {
    proto_bit(protocol) << 8
}

/// The presence bit of a protocol's trie entries (port prefix below 16) in `FW_POLICY_IDS` (protocol 0 has its own bit; rare
/// protocols share one, which costs only a lookup that finds nothing).
#[inline(always)]
pub const fn proto_bit(protocol: u8) -> u32 {
    match protocol {
        0 => 1,
        6 => 2,
        17 => 4,
        1 => 8,
        58 => 16,
        132 => 32,
        _ => 64,
    }
}

/// Policy map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// `POLICY_FLAG_*`.
    pub flags: u8,
    /// Port prefix length of this entry's key (0..=16), so the programs can report which
    /// key decided (the trie returns only the value).
    pub prefix_len: u8,
    /// Local proxy port to steer the flow to (0 = none).
    pub proxy_port: u16,
    /// Slot of this entry's counters in the per-CPU stats array.
    pub stats_index: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

pub const POLICY_FLAG_DENY: u8 = 1;

/// Per-entry counters (per CPU; the loader sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<PolicyStats>() == 16);

/// IPv4 address for the ipcache (LPM data, and the exact-match hash key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ip4 {
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Ip4>() == 4);

/// IPv6 address for the ipcache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ip6 {
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Ip6>() == 16);

/// ipcache value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<IpcacheValue>() == 8);

/// Connection-tracking key: the flow as its first packet saw it, per endpoint and direction,
/// so the two endpoints of a local connection each keep (and enforce) their own entry.
/// IPv4 addresses occupy the first 4 bytes of the 16, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub endpoint_id: u16,
    pub protocol: u8,
    /// `CT_KEY_*`.
    pub flags: u8,
}
const _: () = assert!(size_of::<CtKey>() == 40);

/// The entry was made by the endpoint's egress (else its ingress).
pub const CT_KEY_EGRESS: u8 = 1;
pub const CT_KEY_V6: u8 = 2;

/// Connection-tracking value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) after which the entry is dead.
    pub expires_ns: u64,
    /// The remote peer's identity when the connection was allowed.
    pub remote_identity: u32,
    /// Counters slot of the policy entry that allowed the flow (u32::MAX: none).
    pub stats_index: u32,
    /// Proxy port the flow is steered to (0 = none).
    pub proxy_port: u16,
    /// `CT_FLAG_*`.
    pub flags: u8,
    pub _pad0: u8,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<CtValue>() == 24);

pub const CT_FLAG_SEEN_REPLY: u8 = 1;
/// Allowed only because of audit mode.
pub const CT_FLAG_AUDIT: u8 = 2;
pub const CT_FLAG_FIN_FWD: u8 = 4;
pub const CT_FLAG_FIN_REV: u8 = 8;
pub const CT_FLAG_RST: u8 = 16;

pub const STATS_NONE: u32 = u32::MAX;

/// An event on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u8,
    /// `REASON_*` (drops and audits).
    pub reason: u8,
    pub direction: u8,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    /// Which entry decided: `MATCH_*`.
    pub match_kind: u8,
    pub endpoint_id: u16,
    pub ifindex: u32,
    pub remote_identity: u32,
    /// Packet length.
    pub len: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    /// Destination port (ICMP: type).
    pub dport: u16,
    /// The deciding entry's key.
    pub key_identity: u32,
    pub key_port: u16,
    pub key_protocol: u8,
    pub key_prefix: u8,
    pub proxy_port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<Event>() == 68);

pub const EVENT_DROP: u8 = 1;
pub const EVENT_POLICY_VERDICT: u8 = 2;
pub const EVENT_AUDIT: u8 = 3;

pub const REASON_NONE: u8 = 0;
/// A deny entry matched.
pub const REASON_POLICY_DENY: u8 = 1;
/// No entry matched in an enforced direction.
pub const REASON_POLICY_DEFAULT_DENY: u8 = 2;
/// The interface is not in the endpoint map.
pub const REASON_UNKNOWN_ENDPOINT: u8 = 3;
/// The flow must go to a proxy that has no socket.
pub const REASON_PROXY_UNAVAILABLE: u8 = 4;
/// The headers could not be read.
pub const REASON_MALFORMED: u8 = 5;
/// A later fragment of a datagram whose first fragment was not seen.
pub const REASON_FRAGMENT_UNKNOWN: u8 = 6;

pub const MATCH_NONE: u8 = 0;
/// An entry of the remote's identity.
pub const MATCH_IDENTITY: u8 = 1;
/// An entry of identity 0 (any).
pub const MATCH_ANY: u8 = 2;

/// Global counters (per-CPU array indices).
pub mod counter {
    pub const PACKETS: u32 = 0;
    pub const ALLOWED_NEW: u32 = 1;
    pub const ESTABLISHED: u32 = 2;
    pub const REPLIES: u32 = 3;
    pub const DROP_POLICY: u32 = 4;
    pub const DROP_UNKNOWN_ENDPOINT: u32 = 5;
    pub const DROP_PROXY_UNAVAILABLE: u32 = 6;
    pub const DROP_MALFORMED: u32 = 7;
    pub const AUDITED: u32 = 8;
    pub const REDIRECTED: u32 = 9;
    /// A new connection could not be recorded (map update failed).
    pub const CT_INSERT_FAILED: u32 = 10;
    /// An event was lost: the ring buffer was full.
    pub const EVENTS_LOST: u32 = 11;
    pub const RELATED_ICMP: u32 = 12;
    pub const NON_IP: u32 = 13;
    /// Later fragments without a known first fragment (dropped).
    pub const DROP_FRAGMENT: u32 = 14;
    pub const COUNT: u32 = 15;
    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "allowed_new",
        "established",
        "replies",
        "drop_policy",
        "drop_unknown_endpoint",
        "drop_proxy_unavailable",
        "drop_malformed",
        "audited",
        "redirected",
        "ct_insert_failed",
        "events_lost",
        "related_icmp",
        "non_ip",
        "drop_fragment",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made of integers and byte arrays with explicit
    // padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyIdKey {}
    unsafe impl aya::Pod for PolicyStats {}
    unsafe impl aya::Pod for Ip4 {}
    unsafe impl aya::Pod for Ip6 {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Event {}
}
