//! fqdnwall's kernel programs: identity-based L3/L4 policy on tc/TCX hooks.
//!
//! One object, four entry points sharing one body (`process`):
//! - `fw_from_endpoint`: tc ingress of an endpoint's host-side veth = the endpoint's egress;
//!   the only hook where flows can be steered to a local proxy (`bpf_sk_assign`).
//! - `fw_to_endpoint`: tc egress of that veth = the endpoint's ingress.
//! - `fw_host_ingress` / `fw_host_egress`: host interfaces (host firewall).
//!
//! Per packet: endpoint of the interface → headers → connection tracking (an established flow
//! or a reply passes without a policy lookup) → related ICMP errors → for a new flow, the
//! remote's identity from the ipcache and the policy lookup of `policy::mapstate` (specific
//! identity and identity 0, each: the packet's protocol before protocol 0, longest port
//! prefix; a deny in either wins; else the more specific allow). Drops become passes with an
//! audit event in audit mode. Every map key/value comes from `ebpf-common`.
#![no_std]
#![no_main]
// Map keys held in the per-CPU scratch area are passed by reference on purpose: by value
// they would be copied onto the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
    EbpfContext,
};
use ebpf_common::*;

#[map]
static FW_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static FW_ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);
#[map]
static FW_POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);
#[map]
static FW_POLICY_EXACT: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY, 0);
#[map]
static FW_POLICY_IDS: HashMap<PolicyIdKey, u32> = HashMap::pinned(capacity::POLICY, 0);
#[map]
static FW_POLICY_STATS: PerCpuArray<PolicyStats> = PerCpuArray::pinned(capacity::POLICY, 0);
#[map]
static FW_IPCACHE4: LpmTrie<Ip4, IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE_LPM, 0);
#[map]
static FW_IPCACHE6: LpmTrie<Ip6, IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE_LPM, 0);
#[map]
static FW_IPCACHE4_EXACT: HashMap<Ip4, IpcacheValue> = HashMap::pinned(capacity::IPCACHE_EXACT, 0);
#[map]
static FW_IPCACHE6_EXACT: HashMap<Ip6, IpcacheValue> = HashMap::pinned(capacity::IPCACHE_EXACT, 0);
#[map]
static FW_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CT, 0);
#[map]
static FW_EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
#[map]
static FW_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Per-CPU working memory: the BPF stack (512 bytes over all frames) cannot hold a flow,
/// two conntrack keys and a socket tuple at once.
#[repr(C)]
struct Scratch {
    f: Flow,
    /// The forward conntrack key of the packet.
    fwd: CtKey,
    /// The reverse key, then the keys of an ICMP error's quoted packet.
    other: CtKey,
    tuple: bpf_sock_tuple,
    frag: FragKey,
}

#[map]
static FW_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const BPF_TCP_LISTEN: u32 = 10;
/// BPF_F_CURRENT_NETNS (-1) as the helpers take it.
const CURRENT_NETNS: u64 = u64::MAX;

const OK: i32 = TC_ACT_OK;
const SHOT: i32 = TC_ACT_SHOT;

/// What the headers said.
#[derive(Clone, Copy)]
struct Flow {
    family: u8,
    protocol: u8,
    tcp_flags: u8,
    /// An ICMP error (destination unreachable, time exceeded, ...): `inner` holds the packet
    /// it is about.
    icmp_error: bool,
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Conntrack ports (ICMP echo: the identifier on both sides).
    sport: u16,
    dport: u16,
    /// Port the policy matches (ICMP: the type).
    policy_port: u16,
    /// `FRAG_*`.
    frag: u8,
    /// IPv4 identification / IPv6 fragment id.
    frag_id: u32,
}

const FRAG_NONE: u8 = 0;
/// First fragment of several: carries the transport header.
const FRAG_FIRST: u8 = 1;
/// A later fragment: no transport header.
const FRAG_LATER: u8 = 2;

/// A fragmented datagram, for finding the ports of its later fragments.
#[repr(C)]
#[derive(Clone, Copy)]
struct FragKey {
    saddr: [u8; 16],
    daddr: [u8; 16],
    id: u32,
    protocol: u8,
    family: u8,
    _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FragPorts {
    sport: u16,
    dport: u16,
}

/// Ports of recent first fragments (small and LRU: a datagram's fragments arrive together).
#[map]
static FW_FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = FW_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot of this CPU; programs are not preempted mid-run on one CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn now() -> u64 {
    // The coarse clock (CLOCK_MONOTONIC_COARSE, tick resolution) is enough for lifetimes of
    // seconds and cheaper than reading the clocksource; the loader compares with
    // CLOCK_MONOTONIC, which runs with it.
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Reads a `T` at a constant offset: straight from the linear packet data when it is there
/// (no helper call), else through bpf_skb_load_bytes (non-linear skbs). Only for offsets
/// the compiler sees as constants: the verifier cannot bound a variable packet offset
/// after LLVM folds the size into the comparison.
#[inline(always)]
fn load_fast<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: bounds checked against data_end just above (the verifier checks it too).
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    load(ctx, off)
}

/// Reads the transport header: the common offsets (IPv4 without options, IPv6 without
/// extension headers) as constants for direct access, others through the helper.
#[inline(always)]
fn l4_read<T: Copy>(ctx: &TcContext, l4: usize) -> Result<T, ()> {
    if l4 == ETH_HLEN + 20 {
        load_fast(ctx, ETH_HLEN + 20)
    } else if l4 == ETH_HLEN + 40 {
        load_fast(ctx, ETH_HLEN + 40)
    } else {
        load(ctx, l4)
    }
}

/// Reads a `T` at any offset (bpf_skb_load_bytes).
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load::<T>(off).map_err(|_| ())
}

/// IPv6 extension headers skipped before the transport header.
#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 60 | 51)
}

/// Reads the L3/L4 headers at `l3` (after the Ethernet header). `Ok(None)`: not IP.
#[inline(always)]
fn parse(ctx: &TcContext, l3: usize, eth_proto: u16, f: &mut Flow) -> Result<bool, ()> {
    f.family = 4;
    f.protocol = 0;
    f.tcp_flags = 0;
    f.icmp_error = false;
    f.saddr = [0; 16];
    f.daddr = [0; 16];
    f.sport = 0;
    f.dport = 0;
    f.policy_port = 0;
    f.frag = FRAG_NONE;
    f.frag_id = 0;
    let l4;
    if eth_proto == ETH_P_IP {
        // One read of the fixed header.
        let ip: [u8; 20] = load_fast(ctx, ETH_HLEN)?;
        if ip[0] >> 4 != 4 {
            return Err(());
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(());
        }
        let flags_off = u16::from_be_bytes([ip[6], ip[7]]);
        if flags_off & 0x1fff != 0 {
            f.frag = FRAG_LATER;
        } else if flags_off & 0x2000 != 0 {
            f.frag = FRAG_FIRST;
        }
        f.frag_id = u16::from_be_bytes([ip[4], ip[5]]) as u32;
        f.protocol = ip[9];
        f.saddr[..4].copy_from_slice(&ip[12..16]);
        f.daddr[..4].copy_from_slice(&ip[16..20]);
        l4 = l3 + ihl;
    } else if eth_proto == ETH_P_IPV6 {
        f.family = 6;
        let ip: [u8; 40] = load_fast(ctx, ETH_HLEN)?;
        let mut nh = ip[6];
        f.saddr.copy_from_slice(&ip[8..24]);
        f.daddr.copy_from_slice(&ip[24..40]);
        let mut off = l3 + 40;
        let mut i = 0;
        while i < 4 {
            if is_ext_header(nh) {
                let hdr: [u8; 2] = load(ctx, off)?;
                let cur = nh;
                nh = hdr[0];
                off += if cur == 51 {
                    (hdr[1] as usize + 2) * 4
                } else {
                    (hdr[1] as usize + 1) * 8
                };
            } else if nh == 44 {
                let hdr: [u8; 8] = load(ctx, off)?;
                nh = hdr[0];
                let of = u16::from_be_bytes([hdr[2], hdr[3]]);
                if of & 0xfff8 != 0 {
                    f.frag = FRAG_LATER;
                } else if of & 1 != 0 {
                    f.frag = FRAG_FIRST;
                }
                f.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                off += 8;
            } else {
                break;
            }
            i += 1;
        }
        f.protocol = nh;
        l4 = off;
    } else {
        return Ok(false);
    }
    if f.frag == FRAG_LATER {
        // No transport header: the ports come from the first fragment (in `process`).
        return Ok(true);
    }
    match f.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            if f.protocol == IPPROTO_TCP {
                // Ports through the flags byte (a TCP header has at least 20 bytes).
                let h: [u8; 14] = l4_read(ctx, l4)?;
                f.sport = u16::from_be_bytes([h[0], h[1]]);
                f.dport = u16::from_be_bytes([h[2], h[3]]);
                f.tcp_flags = h[13];
            } else {
                let h: [u8; 4] = l4_read(ctx, l4)?;
                f.sport = u16::from_be_bytes([h[0], h[1]]);
                f.dport = u16::from_be_bytes([h[2], h[3]]);
            }
            f.policy_port = f.dport;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h: [u8; 8] = l4_read(ctx, l4)?;
            let ty = h[0];
            f.policy_port = ty as u16;
            let v6 = f.protocol == IPPROTO_ICMPV6;
            let echo = if v6 {
                ty == 128 || ty == 129
            } else {
                ty == 8 || ty == 0 || ty == 13 || ty == 14
            };
            let error = if v6 {
                (1..=4).contains(&ty)
            } else {
                ty == 3 || ty == 11 || ty == 12
            };
            if echo {
                let id = u16::from_be_bytes([h[4], h[5]]);
                f.sport = id;
                f.dport = id;
            } else if error {
                f.icmp_error = true;
            }
        }
        _ => {}
    }
    Ok(true)
}

/// The flow an ICMP error is about, as a conntrack key of the same endpoint (ports and
/// addresses of the quoted packet, direction not set).
#[inline(never)]
fn parse_inner(ctx: &TcContext, f: &Flow, k: &mut CtKey) -> Result<(), ()> {
    let l3 = ETH_HLEN;
    k.saddr = [0; 16];
    k.daddr = [0; 16];
    k.sport = 0;
    k.dport = 0;
    k.flags = 0;
    let inner;
    let l4;
    if f.family == 4 {
        let vihl: u8 = load(ctx, l3)?;
        inner = l3 + ((vihl & 0x0f) as usize) * 4 + 8;
        let ivihl: u8 = load(ctx, inner)?;
        let ihl = ((ivihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(());
        }
        k.protocol = load(ctx, inner + 9)?;
        let s: [u8; 4] = load(ctx, inner + 12)?;
        let d: [u8; 4] = load(ctx, inner + 16)?;
        k.saddr[..4].copy_from_slice(&s);
        k.daddr[..4].copy_from_slice(&d);
        l4 = inner + ihl;
    } else {
        // Extension headers of the outer packet are rare on ICMPv6 errors; assume none.
        inner = l3 + 40 + 8;
        k.protocol = load(ctx, inner + 6)?;
        k.saddr = load(ctx, inner + 8)?;
        k.daddr = load(ctx, inner + 24)?;
        k.flags = CT_KEY_V6;
        l4 = inner + 40;
    }
    match k.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: [u8; 4] = load(ctx, l4)?;
            k.sport = u16::from_be_bytes([ports[0], ports[1]]);
            k.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h: [u8; 8] = load(ctx, l4)?;
            let id = u16::from_be_bytes([h[4], h[5]]);
            k.sport = id;
            k.dport = id;
        }
        _ => {}
    }
    Ok(())
}

/// Remembers the ports of a first fragment, or gives a later fragment the ports of its
/// datagram. Err: a later fragment of an unknown datagram.
#[inline(always)]
fn track_fragment(s: &mut Scratch) -> Result<(), ()> {
    s.frag.saddr = s.f.saddr;
    s.frag.daddr = s.f.daddr;
    s.frag.id = s.f.frag_id;
    s.frag.protocol = s.f.protocol;
    s.frag.family = s.f.family;
    s.frag._pad = 0;
    if s.f.frag == FRAG_FIRST {
        let ports = FragPorts {
            sport: s.f.sport,
            dport: s.f.dport,
        };
        // A failed insert only costs the later fragments (dropped as unknown).
        let _ = FW_FRAGS.insert(&s.frag, &ports, 0);
        return Ok(());
    }
    // SAFETY: plain value read.
    match unsafe { FW_FRAGS.get(&s.frag) } {
        Some(p) => {
            s.f.sport = p.sport;
            s.f.dport = p.dport;
            s.f.policy_port = p.dport;
            Ok(())
        }
        None => Err(()),
    }
}

#[inline(always)]
fn ipcache_identity(f: &Flow, addr: &[u8; 16]) -> u32 {
    if f.family == 4 {
        let ip = Ip4 {
            addr: [addr[0], addr[1], addr[2], addr[3]],
        };
        // SAFETY: values are plain integers; a concurrent update may tear nothing we rely on.
        if let Some(v) = unsafe { FW_IPCACHE4_EXACT.get(ip) } {
            return v.identity;
        }
        if let Some(v) = FW_IPCACHE4.get(Key::new(32, ip)) {
            return v.identity;
        }
    } else {
        let ip = Ip6 { addr: *addr };
        // SAFETY: as above.
        if let Some(v) = unsafe { FW_IPCACHE6_EXACT.get(ip) } {
            return v.identity;
        }
        if let Some(v) = FW_IPCACHE6.get(Key::new(128, ip)) {
            return v.identity;
        }
    }
    // Not even a default route in the ipcache: the outside world.
    2
}

/// The deciding entry of one identity (the packet's protocol before protocol 0). Every
/// field is always written (no `Option`): LLVM may spill the undefined payload of a `None`,
/// which the verifier rejects as a read of an uninitialised register.
#[derive(Clone, Copy)]
#[repr(C)]
struct Hit {
    value: PolicyValue,
    identity: u32,
    protocol: u8,
    found: u8,
    _pad: u16,
}

const MISS: Hit = Hit {
    value: PolicyValue {
        flags: 0,
        prefix_len: 0,
        proxy_port: 0,
        stats_index: STATS_NONE,
    },
    identity: 0,
    protocol: 0,
    found: 0,
    _pad: 0,
};

#[inline(always)]
fn hit(value: PolicyValue, protocol: u8, identity: u32) -> Hit {
    Hit {
        value,
        identity,
        protocol,
        found: 1,
        _pad: 0,
    }
}

impl Hit {
    #[inline(always)]
    fn deny(&self) -> bool {
        self.found != 0 && self.value.flags & POLICY_FLAG_DENY != 0
    }

    #[inline(always)]
    fn specificity(&self) -> u8 {
        if self.protocol == 0 {
            self.value.prefix_len
        } else {
            17 + self.value.prefix_len
        }
    }
}

#[inline(always)]
fn lookup_identity(ep: u16, identity: u32, dir: u8, protocol: u8, port: u16) -> Hit {
    let idk = PolicyIdKey {
        identity,
        endpoint_id: ep,
        direction: dir,
        _pad: 0,
    };
    // SAFETY: plain value read.
    let bits = match unsafe { FW_POLICY_IDS.get(idk) } {
        Some(b) => *b,
        None => return MISS,
    };
    // The packet's protocol, then protocol 0; within each, the exact port (hash) before
    // the port prefixes (trie): the longest match first, as the trie alone would give.
    if protocol != 0 {
        let h = probe(ep, identity, dir, protocol, port, bits);
        if h.found != 0 {
            return h;
        }
    }
    probe(ep, identity, dir, 0, port, bits)
}

#[inline(always)]
fn probe(ep: u16, identity: u32, dir: u8, protocol: u8, port: u16, bits: u32) -> Hit {
    let (plen, key) = PolicyKey::new(ep, identity, dir, protocol, port, 16);
    if bits & exact_bit(protocol) != 0 {
        // SAFETY: plain value read.
        if let Some(v) = unsafe { FW_POLICY_EXACT.get(&key) } {
            return hit(*v, protocol, identity);
        }
    }
    if bits & proto_bit(protocol) != 0 {
        if let Some(v) = FW_POLICY.get(&Key::new(plen, key)) {
            return hit(*v, protocol, identity);
        }
    }
    MISS
}

/// Exactly `policy::mapstate::MapState::lookup`.
#[inline(always)]
fn policy_lookup(ep: u16, identity: u32, dir: u8, protocol: u8, port: u16) -> Hit {
    let a = if identity != 0 {
        lookup_identity(ep, identity, dir, protocol, port)
    } else {
        MISS
    };
    if a.deny() {
        return a;
    }
    let b = lookup_identity(ep, 0, dir, protocol, port);
    if b.deny() {
        return b;
    }
    if a.found != 0 && b.found != 0 {
        if a.specificity() >= b.specificity() {
            a
        } else {
            b
        }
    } else if a.found != 0 {
        a
    } else {
        b
    }
}

#[inline(always)]
fn count_entry(stats_index: u32, len: u32) {
    if stats_index == STATS_NONE {
        return;
    }
    if let Some(p) = FW_POLICY_STATS.get_ptr_mut(stats_index) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += len as u64;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit(
    kind: u8,
    reason: u8,
    dir: u8,
    f: &Flow,
    ep: u16,
    ifindex: u32,
    remote_identity: u32,
    len: u32,
    hit: &Hit,
    proxy_port: u16,
) {
    let Some(mut entry) = FW_EVENTS.reserve::<Event>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to reserved ring-buffer memory of the size of Event; every field
    // is written before submit (written in place: an Event on the stack would not fit).
    unsafe {
        (*ev).kind = kind;
        (*ev).reason = reason;
        (*ev).direction = dir;
        (*ev).family = f.family;
        (*ev).protocol = f.protocol;
        (*ev).endpoint_id = ep;
        (*ev).ifindex = ifindex;
        (*ev).remote_identity = remote_identity;
        (*ev).len = len;
        (*ev).saddr = f.saddr;
        (*ev).daddr = f.daddr;
        (*ev).sport = f.sport;
        (*ev).dport = f.policy_port;
        (*ev).proxy_port = proxy_port;
        (*ev)._pad = 0;
        if hit.found != 0 {
            (*ev).match_kind = if hit.identity == 0 {
                MATCH_ANY
            } else {
                MATCH_IDENTITY
            };
            (*ev).key_identity = hit.identity;
            (*ev).key_protocol = hit.protocol;
            (*ev).key_prefix = hit.value.prefix_len;
            (*ev).key_port = f.policy_port & port_mask(hit.value.prefix_len);
        } else {
            (*ev).match_kind = MATCH_NONE;
            (*ev).key_identity = 0;
            (*ev).key_protocol = 0;
            (*ev).key_prefix = 0;
            (*ev).key_port = 0;
        }
    }
    entry.submit(0);
}

#[inline(always)]
fn port_mask(prefix_len: u8) -> u16 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 16 {
        u16::MAX
    } else {
        u16::MAX << (16 - prefix_len as u32)
    }
}

#[inline(always)]
fn ct_lifetime(protocol: u8, flags: u8) -> u64 {
    match protocol {
        IPPROTO_TCP => {
            if flags & CT_FLAG_RST != 0
                || flags & (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REV)
                    == (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REV)
            {
                ct_timeout::TCP_CLOSE
            } else if flags & CT_FLAG_SEEN_REPLY != 0 {
                ct_timeout::TCP_ESTABLISHED
            } else {
                ct_timeout::TCP_SYN
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => ct_timeout::ICMP,
        _ => ct_timeout::OTHER,
    }
}

#[inline(always)]
fn ct_closed(flags: u8) -> bool {
    flags & CT_FLAG_RST != 0
        || flags & (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REV) == (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REV)
}

/// Updates a live entry for a packet in the forward (`reply == false`) or reply direction.
#[inline(always)]
fn ct_touch(v: *mut CtValue, f: &Flow, reply: bool, t: u64) {
    // SAFETY: `v` points into the CT map value of this lookup; concurrent writers on other
    // CPUs race only on these plain integers, and any interleaving is a valid state.
    unsafe {
        let mut flags = (*v).flags;
        if reply {
            flags |= CT_FLAG_SEEN_REPLY;
        }
        if f.protocol == IPPROTO_TCP {
            if f.tcp_flags & TCP_RST != 0 {
                flags |= CT_FLAG_RST;
            }
            if f.tcp_flags & TCP_FIN != 0 {
                flags |= if reply {
                    CT_FLAG_FIN_REV
                } else {
                    CT_FLAG_FIN_FWD
                };
            }
        }
        // Writes are rare: the entry's cache line stays shared between CPUs unless the
        // state changes or the lifetime moved by more than a second.
        let expires = t + ct_lifetime(f.protocol, flags);
        if flags != (*v).flags {
            (*v).flags = flags;
            (*v).expires_ns = expires;
        } else if expires > (*v).expires_ns + 1_000_000_000 {
            (*v).expires_ns = expires;
        }
    }
}

/// Steers the packet to the local proxy socket on `port`: an established (accepted)
/// socket of this very flow first, else the listener. Err: no socket.
#[inline(never)]
fn redirect(ctx: &TcContext, s: &mut Scratch, port: u16, mark: u32) -> Result<(), ()> {
    let skb = ctx.as_ptr();
    let f = &s.f;
    let t = &mut s.tuple;
    let size;
    // SAFETY: writes to the union member matching the family.
    unsafe {
        if f.family == 4 {
            let v4 = &mut t.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([f.saddr[0], f.saddr[1], f.saddr[2], f.saddr[3]]);
            v4.daddr = u32::from_ne_bytes([f.daddr[0], f.daddr[1], f.daddr[2], f.daddr[3]]);
            v4.sport = f.sport.to_be();
            v4.dport = f.dport.to_be();
            size = core::mem::size_of_val(v4) as u32;
        } else {
            let v6 = &mut t.__bindgen_anon_1.ipv6;
            v6.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>(f.saddr);
            v6.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>(f.daddr);
            v6.sport = f.sport.to_be();
            v6.dport = f.dport.to_be();
            size = core::mem::size_of_val(v6) as u32;
        }
    }
    let mut sk: *mut bpf_sock = core::ptr::null_mut();
    if f.protocol == IPPROTO_TCP {
        // SAFETY: helper with a tuple of the declared size; the result is released below.
        let s = unsafe { bpf_skc_lookup_tcp(skb, t, size, CURRENT_NETNS, 0) };
        if !s.is_null() {
            // SAFETY: non-null socket reference from the lookup.
            if unsafe { (*s).state } != BPF_TCP_LISTEN {
                sk = s;
            } else {
                // SAFETY: releasing the reference we hold.
                unsafe { bpf_sk_release(s as *mut _) };
            }
        }
    }
    if sk.is_null() {
        // The listener: same tuple with the proxy's port.
        if f.family == 4 {
            t.__bindgen_anon_1.ipv4.dport = port.to_be();
        } else {
            t.__bindgen_anon_1.ipv6.dport = port.to_be();
        }
        // SAFETY: as above.
        sk = unsafe {
            if f.protocol == IPPROTO_TCP {
                bpf_skc_lookup_tcp(skb, t, size, CURRENT_NETNS, 0)
            } else {
                bpf_sk_lookup_udp(skb, t, size, CURRENT_NETNS, 0)
            }
        };
    }
    if sk.is_null() {
        return Err(());
    }
    // SAFETY: `sk` is a referenced socket; assign takes its own reference, we drop ours.
    let r = unsafe { bpf_sk_assign(skb as *mut _, sk as *mut _, 0) };
    // SAFETY: as above.
    unsafe { bpf_sk_release(sk as *mut _) };
    if r != 0 {
        return Err(());
    }
    // The mark selects the policy-routing table whose local route delivers the packet here.
    ctx.set_mark(mark);
    Ok(())
}

/// What the proxy step must do for an allowed packet.
#[inline(always)]
fn proxy_port_for(f: &Flow, entry_port: u16, cfg: &Config) -> (u16, bool) {
    if entry_port != 0 {
        // Policy demands the proxy (L7 rules): fail closed.
        return (entry_port, true);
    }
    if cfg.dns_proxy_port != 0
        && f.dport == 53
        && (f.protocol == IPPROTO_TCP || f.protocol == IPPROTO_UDP)
    {
        // DNS interception for visibility/learning only: without a proxy socket the query
        // still goes where it was sent.
        return (cfg.dns_proxy_port, false);
    }
    (0, false)
}

#[inline(always)]
fn steer(ctx: &TcContext, s: &mut Scratch, entry_port: u16, cfg: &Config) -> Result<u16, ()> {
    // SAFETY: reading the context's mark field.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if cfg.proxy_mark_mask != 0 && mark & cfg.proxy_mark_mask == cfg.proxy_out_mark {
        return Ok(0);
    }
    let (port, required) = proxy_port_for(&s.f, entry_port, cfg);
    if port == 0 {
        return Ok(0);
    }
    match redirect(ctx, s, port, cfg.proxy_mark) {
        Ok(()) => {
            count(counter::REDIRECTED);
            Ok(port)
        }
        Err(()) if required => Err(()),
        Err(()) => Ok(0),
    }
}

#[inline(always)]
fn process(ctx: &TcContext, dir: u8, may_redirect: bool) -> i32 {
    count(counter::PACKETS);
    // SAFETY: reading the context's ifindex/len fields.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    // SAFETY: plain value.
    let ep = match unsafe { FW_ENDPOINTS.get(ifindex) } {
        Some(ep) => *ep,
        None => {
            count(counter::DROP_UNKNOWN_ENDPOINT);
            return SHOT;
        }
    };
    let eth_proto: u16 = match load_fast::<u16>(ctx, 12) {
        Ok(p) => u16::from_be(p),
        Err(_) => {
            count(counter::NON_IP);
            return OK;
        }
    };
    let Some(sp) = FW_SCRATCH.get_ptr_mut(0) else {
        return SHOT;
    };
    // SAFETY: this CPU's scratch slot; one program run uses it at a time.
    let s = unsafe { &mut *sp };
    match parse(ctx, ETH_HLEN, eth_proto, &mut s.f) {
        Ok(true) => {}
        Ok(false) => {
            count(counter::NON_IP);
            return OK;
        }
        Err(()) => {
            count(counter::DROP_MALFORMED);
            s.f.family = if eth_proto == ETH_P_IPV6 { 6 } else { 4 };
            emit(
                EVENT_DROP,
                REASON_MALFORMED,
                dir,
                &s.f,
                ep.endpoint_id,
                ifindex,
                0,
                len,
                &MISS,
                0,
            );
            return SHOT;
        }
    }
    // Neighbour discovery and multicast listener messages keep IPv6 working whatever the
    // policy says (as Cilium does).
    if s.f.protocol == IPPROTO_ICMPV6 && matches!(s.f.policy_port, 130..=137 | 143) {
        return OK;
    }
    if s.f.frag != FRAG_NONE
        && matches!(s.f.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
        && track_fragment(s).is_err()
    {
        // A later fragment whose first fragment was not seen: its flow is unknown.
        count(counter::DROP_FRAGMENT);
        emit(
            EVENT_DROP,
            REASON_FRAGMENT_UNKNOWN,
            dir,
            &s.f,
            ep.endpoint_id,
            ifindex,
            0,
            len,
            &MISS,
            0,
        );
        return SHOT;
    }
    let cfg = match FW_CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    };
    let t = now();
    let v6flag = if s.f.family == 6 { CT_KEY_V6 } else { 0 };
    let dirflag = if dir == DIR_EGRESS { CT_KEY_EGRESS } else { 0 };
    s.fwd.saddr = s.f.saddr;
    s.fwd.daddr = s.f.daddr;
    s.fwd.sport = s.f.sport;
    s.fwd.dport = s.f.dport;
    s.fwd.endpoint_id = ep.endpoint_id;
    s.fwd.protocol = s.f.protocol;
    s.fwd.flags = v6flag | dirflag;
    let syn_only = s.f.protocol == IPPROTO_TCP && s.f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(v) = FW_CT.get_ptr_mut(&s.fwd) {
        // SAFETY: map value pointer valid for this program run.
        let (expires, flags, stats, proxy) = unsafe {
            (
                (*v).expires_ns,
                (*v).flags,
                (*v).stats_index,
                (*v).proxy_port,
            )
        };
        if expires > t && !(syn_only && ct_closed(flags)) {
            ct_touch(v, &s.f, false, t);
            count(counter::ESTABLISHED);
            count_entry(stats, len);
            if proxy != 0 && may_redirect && redirect(ctx, s, proxy, cfg.proxy_mark).is_err() {
                count(counter::DROP_PROXY_UNAVAILABLE);
                return SHOT;
            }
            return OK;
        }
    }
    s.other.saddr = s.f.daddr;
    s.other.daddr = s.f.saddr;
    s.other.sport = s.f.dport;
    s.other.dport = s.f.sport;
    s.other.endpoint_id = ep.endpoint_id;
    s.other.protocol = s.f.protocol;
    s.other.flags = v6flag | (dirflag ^ CT_KEY_EGRESS);
    if let Some(v) = FW_CT.get_ptr_mut(&s.other) {
        // SAFETY: as above.
        if unsafe { (*v).expires_ns } > t {
            ct_touch(v, &s.f, true, t);
            count(counter::REPLIES);
            return OK;
        }
    }
    if s.f.icmp_error && parse_inner(ctx, &s.f, &mut s.other).is_ok() {
        // The quoted packet travelled the other way: it is either the original direction
        // of a flow of the opposite direction, or a reply of ours.
        s.other.endpoint_id = ep.endpoint_id;
        s.other.flags = v6flag | (dirflag ^ CT_KEY_EGRESS);
        let mut related = false;
        // SAFETY: plain value read.
        if let Some(v) = unsafe { FW_CT.get(&s.other) } {
            related = v.expires_ns > t;
        }
        if !related {
            let (a, p) = (s.other.saddr, s.other.sport);
            s.other.saddr = s.other.daddr;
            s.other.sport = s.other.dport;
            s.other.daddr = a;
            s.other.dport = p;
            s.other.flags = v6flag | dirflag;
            // SAFETY: as above.
            if let Some(v) = unsafe { FW_CT.get(&s.other) } {
                related = v.expires_ns > t;
            }
        }
        if related {
            count(counter::RELATED_ICMP);
            return OK;
        }
    }

    // A new flow: policy.
    let remote_identity = if dir == DIR_EGRESS {
        ipcache_identity(&s.f, &s.f.daddr)
    } else {
        ipcache_identity(&s.f, &s.f.saddr)
    };
    let enforced = ep.flags
        & if dir == DIR_EGRESS {
            EP_FLAG_ENFORCE_EGRESS
        } else {
            EP_FLAG_ENFORCE_INGRESS
        }
        != 0;
    let hit = if enforced {
        policy_lookup(
            ep.endpoint_id,
            remote_identity,
            dir,
            s.f.protocol,
            s.f.policy_port,
        )
    } else {
        MISS
    };
    let allowed = !enforced || (hit.found != 0 && !hit.deny());
    let mut ct_flags = 0u8;
    let mut ev_kind = 0u8;
    let mut reason = REASON_NONE;
    let mut verdict = OK;
    let mut ev_proxy = 0u16;
    if !allowed {
        reason = if hit.found != 0 {
            REASON_POLICY_DENY
        } else {
            REASON_POLICY_DEFAULT_DENY
        };
        count_entry(hit.value.stats_index, len);
        if ep.flags & EP_FLAG_AUDIT != 0 || cfg.flags & CONFIG_FLAG_AUDIT != 0 {
            count(counter::AUDITED);
            ev_kind = EVENT_AUDIT;
            ct_flags = CT_FLAG_AUDIT;
        } else {
            count(counter::DROP_POLICY);
            ev_kind = EVENT_DROP;
            verdict = SHOT;
        }
    }
    if verdict == OK {
        let (entry_proxy, stats_index) = if allowed && hit.found != 0 {
            (hit.value.proxy_port, hit.value.stats_index)
        } else {
            (0, STATS_NONE)
        };
        if allowed {
            count_entry(stats_index, len);
        }
        let may = may_redirect && ep.flags & EP_FLAG_HOST == 0 && allowed;
        let steered = if may {
            steer(ctx, s, entry_proxy, &cfg)
        } else if entry_proxy != 0 {
            // The entry demands a proxy (L7 rules) but this hook cannot steer (tc egress, or
            // a host interface): dropping is the only way not to bypass the L7 rules.
            Err(())
        } else {
            Ok(0)
        };
        match steered {
            Ok(proxy_port) => {
                count(counter::ALLOWED_NEW);
                let value = CtValue {
                    expires_ns: t + ct_lifetime(s.f.protocol, ct_flags),
                    remote_identity,
                    stats_index,
                    proxy_port,
                    flags: ct_flags,
                    _pad0: 0,
                    _pad1: 0,
                };
                if FW_CT.insert(&s.fwd, &value, 0).is_err() {
                    count(counter::CT_INSERT_FAILED);
                }
                if allowed && cfg.flags & CONFIG_FLAG_VERDICT_EVENTS != 0 {
                    ev_kind = EVENT_POLICY_VERDICT;
                    ev_proxy = proxy_port;
                }
            }
            Err(()) => {
                count(counter::DROP_PROXY_UNAVAILABLE);
                ev_kind = EVENT_DROP;
                reason = REASON_PROXY_UNAVAILABLE;
                ev_proxy = entry_proxy;
                verdict = SHOT;
            }
        }
    }
    if ev_kind != 0 {
        emit(
            ev_kind,
            reason,
            dir,
            &s.f,
            ep.endpoint_id,
            ifindex,
            remote_identity,
            len,
            &hit,
            ev_proxy,
        );
    }
    verdict
}

#[classifier]
pub fn fw_from_endpoint(ctx: TcContext) -> i32 {
    process(&ctx, DIR_EGRESS, true)
}

#[classifier]
pub fn fw_to_endpoint(ctx: TcContext) -> i32 {
    process(&ctx, DIR_INGRESS, false)
}

#[classifier]
pub fn fw_host_ingress(ctx: TcContext) -> i32 {
    process(&ctx, DIR_INGRESS, false)
}

#[classifier]
pub fn fw_host_egress(ctx: TcContext) -> i32 {
    process(&ctx, DIR_EGRESS, false)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
