//! fqdnwall's eBPF datapath, user side: loads the kernel programs (built from `ebpf/kernel`
//! by build.rs and embedded), creates or adopts their maps and links pinned under a bpffs
//! directory, and turns policy map diffs and ipcache changes into map updates.
//!
//! Everything the kernel needs to keep enforcing lives in bpffs: maps under `PIN/maps/`, one
//! TCX link per hook under `PIN/links/`. Dropping a [`BpfDatapath`] leaves them in place, so
//! enforcement survives the agent; the next [`BpfDatapath::load_or_adopt`] adopts them and
//! rebuilds its own bookkeeping (counter slots, attachments) from the maps. Only
//! [`BpfDatapath::unload`] removes them.
//!
//! Map layout (types in `ebpf-common`):
//! - `FW_ENDPOINTS` hash: ifindex → endpoint id, identity, flags (audit, enforcement per
//!   direction, host).
//! - `FW_POLICY`: one LPM trie for all endpoints, key (identity, endpoint id, direction,
//!   protocol, port prefix), value (deny, proxy port, counter slot). One trie rather than a
//!   map per endpoint: no map-in-map indirection per packet, one capacity to watch, and the
//!   endpoint id sits inside the always-matched part of the prefix.
//! - `FW_POLICY_STATS` per-CPU array: packets/bytes per counter slot.
//! - `FW_IPCACHE4/6` LPM tries and `FW_IPCACHE4/6_EXACT` hashes (/32 and /128 go to the hash,
//!   looked up first).
//! - `FW_CT` LRU hash: per endpoint and direction flow → expiry, state, counter slot, proxy.
//! - `FW_EVENTS` ring buffer, `FW_COUNTERS` per-CPU global counters, `FW_CONFIG`.
//!
//! Ordering contract for callers: apply policy map diffs before the ipcache upserts that make
//! traffic use them (an IP must not map to an identity whose entries are missing), and
//! ipcache deletes before the policy deletes. Every method returns after the kernel holds the
//! change, so the next packet sees it.
//!
//! Using it (the agent):
//! 1. [`BpfDatapath::load_or_adopt`] with the pin directory, capacities and
//!    [`DatapathConfig`] (DNS proxy port, proxy marks, global audit, verdict events).
//! 2. With proxies or DNS interception: [`ProxyRouting::install`] once (fwmark rule + local
//!    routes); the proxies listen with `IP_TRANSPARENT` on `0.0.0.0:PORT` / `[::]:PORT`
//!    (UDP with `IP_RECVORIGDSTADDR`, TCP reads the original destination with
//!    getsockname), answer UDP from a transparent socket bound to the original destination,
//!    and mark their upstream sockets (`SO_MARK`) with `proxy_out_mark`.
//! 3. Per endpoint: [`BpfDatapath::attach_endpoint`] on its host-side veth (again to change
//!    audit/enforcement flags; on an adopted interface this also swaps in this build's
//!    programs); the host: [`BpfDatapath::attach_host`] per host interface.
//! 4. Per engine change: [`BpfDatapath::apply_map_diff`] for every endpoint diff, then
//!    [`BpfDatapath::upsert_ipcache`] / [`BpfDatapath::delete_ipcache`].
//! 5. After adopting: [`BpfDatapath::reconcile_policy`] per endpoint, then
//!    [`BpfDatapath::reconcile_ipcache`]; endpoints that are gone: `flush_endpoint_policy` and
//!    `detach`.
//! 6. Reads: `policy_entries` (bpf policy get), `ipcache_entries`, `connections` /
//!    `live_peers` / `is_connection_alive` (FQDN zombies), `events` (monitor), `status`.
//! 7. Stop: drop it (enforcement stays) or [`BpfDatapath::unload`] (`--unload-on-stop`).

mod error;
pub mod events;
mod routing;
mod sys;
pub mod testrun;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{
    Array, HashMap as BpfHash, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues, RingBuf,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{qdisc_add_clsact, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ebpf_common::{self as c, map_names as names, prog_names};
use ipnet::IpNet;
use policy::mapstate::{MapDiff, MapKey};
use policy::model::Direction;

pub use error::Error;
pub use events::{DatapathEvent, EventKind, EventStream, MatchedEntry, Reason};
pub use routing::ProxyRouting;
pub use types::*;

/// The kernel object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fqdnwall-bpf.o"));

/// Key and value sizes each map must have; a pinned map that differs is from another build.
const LAYOUT: [(&str, u32, u32); 13] = [
    (names::CONFIG, 4, size_of::<c::Config>() as u32),
    (names::ENDPOINTS, 4, size_of::<c::EndpointInfo>() as u32),
    (
        names::POLICY,
        4 + size_of::<c::PolicyKey>() as u32,
        size_of::<c::PolicyValue>() as u32,
    ),
    (names::POLICY_STATS, 4, size_of::<c::PolicyStats>() as u32),
    (names::POLICY_IDS, size_of::<c::PolicyIdKey>() as u32, 4),
    (
        names::POLICY_EXACT,
        size_of::<c::PolicyKey>() as u32,
        size_of::<c::PolicyValue>() as u32,
    ),
    (names::IPCACHE4, 8, size_of::<c::IpcacheValue>() as u32),
    (names::IPCACHE6, 20, size_of::<c::IpcacheValue>() as u32),
    (
        names::IPCACHE4_EXACT,
        4,
        size_of::<c::IpcacheValue>() as u32,
    ),
    (
        names::IPCACHE6_EXACT,
        16,
        size_of::<c::IpcacheValue>() as u32,
    ),
    (
        names::CT,
        size_of::<c::CtKey>() as u32,
        size_of::<c::CtValue>() as u32,
    ),
    (names::EVENTS, 0, 0),
    (names::COUNTERS, 4, 8),
];

type PolicyTrie = LpmTrie<MapData, c::PolicyKey, c::PolicyValue>;

/// A policy entry's full trie key: (prefix length, key data).
type FullKey = (u32, c::PolicyKey);

struct Maps {
    config: Array<MapData, c::Config>,
    endpoints: BpfHash<MapData, u32, c::EndpointInfo>,
    policy: PolicyTrie,
    policy_exact: BpfHash<MapData, c::PolicyKey, c::PolicyValue>,
    policy_stats: PerCpuArray<MapData, c::PolicyStats>,
    policy_ids: BpfHash<MapData, c::PolicyIdKey, u32>,
    ip4: LpmTrie<MapData, c::Ip4, c::IpcacheValue>,
    ip6: LpmTrie<MapData, c::Ip6, c::IpcacheValue>,
    ip4x: BpfHash<MapData, c::Ip4, c::IpcacheValue>,
    ip6x: BpfHash<MapData, c::Ip6, c::IpcacheValue>,
    ct: BpfHash<MapData, c::CtKey, c::CtValue>,
    counters: PerCpuArray<MapData, u64>,
}

/// The ipcache maps by slot, the index of `Inner::ipcache_counts`: host prefixes of each
/// family in an exact-match hash (probed first by the programs), other prefixes in an LPM trie.
const IPCACHE_MAPS: [&str; 4] = [
    names::IPCACHE4_EXACT,
    names::IPCACHE4,
    names::IPCACHE6_EXACT,
    names::IPCACHE6,
];

/// Evaluates `$body` with `$map` bound to the ipcache map that files `$prefix`, `$key` to the
/// prefix's key in it and `$slot` to the map's index in [`IPCACHE_MAPS`]. A macro because
/// aya's hash maps and LPM tries share no trait (and differ in key type); their `get`,
/// `insert` and `remove` all take the key by reference, so one `$body` serves all four.
macro_rules! with_ipcache_map {
    ($maps:expr, $prefix:expr, |$slot:ident, $map:ident, $key:ident| $body:expr) => {{
        let maps = &mut $maps;
        match $prefix.trunc() {
            IpNet::V4(n) => with_ipcache_map!(@family n, Ip4, 32, 0, maps.ip4x, maps.ip4,
                |$slot, $map, $key| $body),
            IpNet::V6(n) => with_ipcache_map!(@family n, Ip6, 128, 2, maps.ip6x, maps.ip6,
                |$slot, $map, $key| $body),
        }
    }};
    // One family: the host prefix goes to the exact map in slot `$base`, any other to the
    // trie in the slot after it.
    (@family $n:ident, $addr:ident, $host_len:literal, $base:literal, $exact:expr, $lpm:expr,
        |$slot:ident, $map:ident, $key:ident| $body:expr) => {{
        let addr = c::$addr {
            addr: $n.addr().octets(),
        };
        if $n.prefix_len() == $host_len {
            let ($slot, $map, $key) = ($base, &mut $exact, addr);
            $body
        } else {
            let key = Key::new(u32::from($n.prefix_len()), addr);
            let ($slot, $map, $key) = ($base + 1, &mut $lpm, key);
            $body
        }
    }};
}

/// Appends the (prefix, identity) entries of the ipcache map in `slot`, whose keys `prefix`
/// turns into an address and a prefix length; a key that is no valid prefix is skipped.
fn collect_ipcache<K>(
    out: &mut Vec<(IpNet, u32)>,
    slot: usize,
    items: impl Iterator<Item = Result<(K, c::IpcacheValue), MapError>>,
    prefix: impl Fn(K) -> (IpAddr, u8),
) -> Result<(), Error> {
    for item in items {
        let (k, v) = item.map_err(|source| Error::Map {
            map: IPCACHE_MAPS[slot],
            source,
        })?;
        let (addr, len) = prefix(k);
        if let Ok(n) = IpNet::new(addr, len) {
            out.push((n, v.identity));
        }
    }
    Ok(())
}

/// Capacities as the kernel maps have them (adopted maps keep theirs).
#[derive(Debug, Clone, Copy)]
struct Actual {
    endpoints: u32,
    policy: u32,
    ipcache_lpm: u32,
    ipcache_exact: u32,
    ct: u32,
}

impl Actual {
    /// The capacity of the ipcache map in `slot` (see [`IPCACHE_MAPS`]).
    fn ipcache_capacity(&self, slot: usize) -> u32 {
        match slot {
            0 | 2 => self.ipcache_exact,
            _ => self.ipcache_lpm,
        }
    }
}

struct Inner {
    ebpf: Ebpf,
    maps: Maps,
    caps: Actual,
    /// Every policy entry in the kernel: its value (the counter slot inside).
    policy: HashMap<FullKey, c::PolicyValue>,
    free_slots: Vec<u32>,
    /// Entries per (endpoint, direction, identity) and protocol bit: the source of
    /// `FW_POLICY_IDS`.
    id_counts: HashMap<c::PolicyIdKey, [u32; 16]>,
    ipcache_counts: [u64; 4],
    links: BTreeMap<(u32, bool /* ingress */), PinnedLink>,
    attachments: BTreeMap<u32, Attachment>,
    nr_cpus: usize,
}

/// The eBPF datapath: loaded programs, pinned maps and links, and their bookkeeping.
pub struct BpfDatapath {
    pin_dir: PathBuf,
    adopted: bool,
    inner: Mutex<Inner>,
    events: Mutex<Option<RingBuf<MapData>>>,
    map_full_errors: AtomicU64,
}

fn maps_dir(pin: &Path) -> PathBuf {
    pin.join("maps")
}

fn links_dir(pin: &Path) -> PathBuf {
    pin.join("links")
}

fn link_path(pin: &Path, ifindex: u32, ingress: bool) -> PathBuf {
    links_dir(pin).join(format!(
        "{ifindex}-{}",
        if ingress { "ingress" } else { "egress" }
    ))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The name of an interface.
pub fn ifname(ifindex: u32) -> Result<String, Error> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr() as *mut libc::c_char) };
    if p.is_null() {
        return Err(Error::NoIfindex(ifindex));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The index of an interface.
pub fn ifindex(name: &str) -> Result<u32, Error> {
    let c = CString::new(name).map_err(|_| Error::NoInterface(name.to_string()))?;
    // SAFETY: a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(Error::NoInterface(name.to_string()));
    }
    Ok(i)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Map {
        map: name,
        source: MapError::InvalidName {
            name: name.to_string(),
        },
    })?;
    T::try_from(map).map_err(|source| Error::Map { map: name, source })
}

fn dir_u8(d: Direction) -> u8 {
    match d {
        Direction::Ingress => c::DIR_INGRESS,
        Direction::Egress => c::DIR_EGRESS,
    }
}

fn port_mask(prefix_len: u8) -> u16 {
    if prefix_len == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(prefix_len.min(16)))
    }
}

/// The trie key of a policy entry, checked.
fn full_key(endpoint: u16, k: &MapKey) -> Result<FullKey, Error> {
    if k.prefix_len > 16 {
        return Err(Error::InvalidEntry {
            endpoint,
            reason: format!("port prefix length {} > 16", k.prefix_len),
        });
    }
    if k.port & !port_mask(k.prefix_len) != 0 {
        return Err(Error::InvalidEntry {
            endpoint,
            reason: format!(
                "port {} has bits below its prefix length {}",
                k.port, k.prefix_len
            ),
        });
    }
    Ok(c::PolicyKey::new(
        endpoint,
        k.identity,
        dir_u8(k.direction),
        k.protocol,
        k.port,
        k.prefix_len,
    ))
}

fn id_key(fk: &FullKey) -> c::PolicyIdKey {
    c::PolicyIdKey {
        identity: fk.1.identity,
        endpoint_id: fk.1.endpoint_id,
        direction: fk.1.direction,
        _pad: 0,
    }
}

/// The presence bit of an entry: exact ports and port prefixes apart, per protocol class.
fn presence_bit(fk: &FullKey) -> u32 {
    if fk.0 == c::POLICY_PREFIX_EXACT {
        c::exact_bit(fk.1.protocol)
    } else {
        c::proto_bit(fk.1.protocol)
    }
}

fn mask_of(counts: &[u32; 16]) -> u32 {
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .fold(0, |m, (i, _)| m | (1 << i))
}

fn map_key(fk: &FullKey) -> (u16, MapKey) {
    let (plen, k) = fk;
    (
        k.endpoint_id,
        MapKey {
            identity: k.identity,
            direction: if k.direction == c::DIR_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            protocol: k.protocol,
            port: u16::from_be(k.dport_be),
            prefix_len: plen.saturating_sub(c::POLICY_PREFIX_FIXED) as u8,
        },
    )
}

fn check_layout(pin: &Path) -> Result<bool, Error> {
    let mut any = false;
    for (name, key, value) in LAYOUT {
        let path = maps_dir(pin).join(name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|source| Error::Map { map: name, source })?;
        if info.key_size() != key || info.value_size() != value {
            return Err(Error::Incompatible {
                path,
                key_size: info.key_size(),
                value_size: info.value_size(),
                want_key: key,
                want_value: value,
            });
        }
    }
    Ok(any)
}

/// The capacity of a pinned map as the kernel created it.
fn max_entries(pin: &Path, name: &'static str) -> Result<u32, Error> {
    Ok(MapInfo::from_pin(maps_dir(pin).join(name))
        .map_err(|source| Error::Map { map: name, source })?
        .max_entries())
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when the pins go there and nothing is mounted (as Cilium
/// does): pins on any other filesystem fail.
fn ensure_bpffs(pin: &Path) -> Result<(), Error> {
    if !pin.starts_with(BPFFS) {
        return Ok(());
    }
    let path = CString::new(BPFFS).expect("no NUL");
    // SAFETY: statfs writes the struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: valid strings; no data argument.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(Error::io(
            format!("mounting bpffs at {BPFFS}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl BpfDatapath {
    /// Loads the programs and creates the maps pinned under `opts.pin_dir`, or adopts the
    /// maps and links already pinned there (a previous run's enforcement continues
    /// untouched). The global config is (re)written from `opts.config`.
    pub fn load_or_adopt(opts: &LoadOptions) -> Result<BpfDatapath, Error> {
        let pin = opts.pin_dir.clone();
        ensure_bpffs(&pin)?;
        for d in [maps_dir(&pin), links_dir(&pin)] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        let adopted = check_layout(&pin)?;
        let caps = &opts.capacities;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(maps_dir(&pin))
            .map_max_entries(names::ENDPOINTS, caps.endpoints)
            .map_max_entries(names::POLICY, caps.policy)
            .map_max_entries(names::POLICY_STATS, caps.policy)
            .map_max_entries(names::POLICY_IDS, caps.policy)
            .map_max_entries(names::POLICY_EXACT, caps.policy)
            .map_max_entries(names::IPCACHE4, caps.ipcache_lpm)
            .map_max_entries(names::IPCACHE6, caps.ipcache_lpm)
            .map_max_entries(names::IPCACHE4_EXACT, caps.ipcache_exact)
            .map_max_entries(names::IPCACHE6_EXACT, caps.ipcache_exact)
            .map_max_entries(names::CT, caps.conntrack)
            .map_max_entries(names::EVENTS, caps.events_bytes);
        let mut ebpf = loader.load(OBJECT)?;
        for name in [
            prog_names::FROM_ENDPOINT,
            prog_names::TO_ENDPOINT,
            prog_names::HOST_INGRESS,
            prog_names::HOST_EGRESS,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Command(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|source| Error::Program {
                    program: static_prog(name),
                    source,
                })?;
            // The verifier gives up with EAGAIN when a signal arrives mid-check (SIGCHLD of
            // some child of this process, say): try again.
            let mut attempt = 0;
            loop {
                match prog.load() {
                    Ok(()) => break,
                    Err(aya::programs::ProgramError::LoadError { io_error, .. })
                        if attempt < 5
                            && matches!(
                                io_error.raw_os_error(),
                                Some(libc::EAGAIN) | Some(libc::EINTR)
                            ) =>
                    {
                        attempt += 1;
                    }
                    Err(source) => {
                        return Err(Error::Program {
                            program: static_prog(name),
                            source,
                        })
                    }
                }
            }
        }
        let maps = Maps {
            config: take(&mut ebpf, names::CONFIG)?,
            endpoints: take(&mut ebpf, names::ENDPOINTS)?,
            policy: take(&mut ebpf, names::POLICY)?,
            policy_exact: take(&mut ebpf, names::POLICY_EXACT)?,
            policy_stats: take(&mut ebpf, names::POLICY_STATS)?,
            policy_ids: take(&mut ebpf, names::POLICY_IDS)?,
            ip4: take(&mut ebpf, names::IPCACHE4)?,
            ip6: take(&mut ebpf, names::IPCACHE6)?,
            ip4x: take(&mut ebpf, names::IPCACHE4_EXACT)?,
            ip6x: take(&mut ebpf, names::IPCACHE6_EXACT)?,
            ct: take(&mut ebpf, names::CT)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
        };
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let actual = Actual {
            endpoints: max_entries(&pin, names::ENDPOINTS)?,
            policy: max_entries(&pin, names::POLICY)?,
            ipcache_lpm: max_entries(&pin, names::IPCACHE4)?,
            ipcache_exact: max_entries(&pin, names::IPCACHE4_EXACT)?,
            ct: max_entries(&pin, names::CT)?,
        };
        let nr_cpus =
            aya::util::nr_cpus().map_err(|(what, e)| Error::io(format!("reading {what}"), e))?;
        let mut inner = Inner {
            ebpf,
            maps,
            caps: actual,
            policy: HashMap::new(),
            free_slots: Vec::new(),
            id_counts: HashMap::new(),
            ipcache_counts: [0; 4],
            links: BTreeMap::new(),
            attachments: BTreeMap::new(),
            nr_cpus,
        };
        inner.rebuild(&pin)?;
        inner.write_config(&opts.config)?;
        Ok(BpfDatapath {
            pin_dir: pin,
            adopted,
            inner: Mutex::new(inner),
            events: Mutex::new(Some(events)),
            map_full_errors: AtomicU64::new(0),
        })
    }

    /// Whether pinned state existed when this datapath was loaded.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps consistent (each update is one syscall).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full(&self, e: Error) -> Error {
        if matches!(e, Error::MapFull { .. }) {
            self.map_full_errors.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// Rewrites the global settings.
    pub fn set_config(&self, cfg: &DatapathConfig) -> Result<(), Error> {
        self.lock().write_config(cfg)
    }

    /// Attaches the programs to an interface and records its endpoint. Attaching an
    /// interface that is already attached (also by a previous run) only updates the
    /// endpoint record: the pinned links stay.
    pub fn attach(&self, ifindex: u32, kind: AttachKind, ep: EndpointSpec) -> Result<(), Error> {
        let ifname = ifname(ifindex)?;
        let mut inner = self.lock();
        let mut flags = 0u16;
        if ep.flags.audit {
            flags |= c::EP_FLAG_AUDIT;
        }
        if ep.flags.enforce_ingress {
            flags |= c::EP_FLAG_ENFORCE_INGRESS;
        }
        if ep.flags.enforce_egress {
            flags |= c::EP_FLAG_ENFORCE_EGRESS;
        }
        if kind == AttachKind::Host {
            flags |= c::EP_FLAG_HOST;
        }
        let info = c::EndpointInfo {
            endpoint_id: ep.id,
            flags,
            identity: ep.identity,
        };
        // The endpoint record first: a program on an interface without one drops.
        let cap = inner.caps.endpoints;
        inner
            .maps
            .endpoints
            .insert(ifindex, info, 0)
            .map_err(|e| self.full(error::map_err(names::ENDPOINTS, cap, e)))?;
        inner.attachments.insert(
            ifindex,
            Attachment {
                program_ids: [0; 2],
                ifindex,
                ifname: ifname.clone(),
                kind,
                endpoint: ep,
            },
        );
        let (ing, egr) = match kind {
            AttachKind::Endpoint => (prog_names::FROM_ENDPOINT, prog_names::TO_ENDPOINT),
            AttachKind::Host => (prog_names::HOST_INGRESS, prog_names::HOST_EGRESS),
        };
        // clsact is not needed by TCX; older kernels fall back to it. "exists" is fine.
        let _ = qdisc_add_clsact(&ifname);
        for (prog, ingress) in [(ing, true), (egr, false)] {
            if inner.links.contains_key(&(ifindex, ingress)) {
                // Adopted (or attached before): swap in this loader's program in one step,
                // so an upgraded agent runs its own code with no gap in enforcement.
                let path = link_path(&self.pin_dir, ifindex, ingress);
                inner.update_link(prog, &path)?;
                continue;
            }
            let path = link_path(&self.pin_dir, ifindex, ingress);
            match inner.attach_one(prog, &ifname, ingress, &path) {
                Ok(link) => {
                    inner.links.insert((ifindex, ingress), link);
                }
                Err(e) => {
                    drop(inner);
                    let _ = self.detach(ifindex);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The programs this datapath loaded: (name, kernel program id).
    pub fn programs(&self) -> Result<Vec<(&'static str, u32)>, Error> {
        let inner = self.lock();
        let mut out = Vec::new();
        for name in [
            prog_names::FROM_ENDPOINT,
            prog_names::TO_ENDPOINT,
            prog_names::HOST_INGRESS,
            prog_names::HOST_EGRESS,
        ] {
            out.push((name, inner.prog_id(name)?));
        }
        Ok(out)
    }

    /// Attaches the endpoint programs to an endpoint's host-side interface.
    pub fn attach_endpoint(&self, ifname: &str, ep: EndpointSpec) -> Result<u32, Error> {
        let i = ifindex(ifname)?;
        self.attach(i, AttachKind::Endpoint, ep)?;
        Ok(i)
    }

    /// Attaches the host firewall programs to a host interface.
    pub fn attach_host(&self, ifname: &str, ep: EndpointSpec) -> Result<u32, Error> {
        let i = ifindex(ifname)?;
        self.attach(i, AttachKind::Host, ep)?;
        Ok(i)
    }

    /// Detaches the programs of an interface and forgets its endpoint record. Policy entries
    /// of the endpoint stay (see [`BpfDatapath::flush_endpoint_policy`]).
    pub fn detach(&self, ifindex: u32) -> Result<(), Error> {
        let mut inner = self.lock();
        let mut found = false;
        for ingress in [true, false] {
            if let Some(link) = inner.links.remove(&(ifindex, ingress)) {
                found = true;
                let path = link_path(&self.pin_dir, ifindex, ingress);
                // Unpinning and dropping the last reference detaches the program.
                link.unpin()
                    .map_err(|e| Error::io(format!("unpinning {}", path.display()), e))?;
            }
        }
        found |= inner.attachments.remove(&ifindex).is_some();
        // Programs are gone from the interface; now its record may go.
        match inner.maps.endpoints.remove(&ifindex) {
            Ok(()) => found = true,
            Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => {}
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(Error::Map {
                    map: names::ENDPOINTS,
                    source,
                })
            }
        }
        if found {
            Ok(())
        } else {
            Err(Error::NotAttached(ifindex))
        }
    }

    /// Applies one endpoint's policy map diff. Order, so that no intermediate state allows
    /// more than the final one: allow deletes, deny upserts, allow upserts, deny deletes.
    /// (A moment with fewer allows than the final state remains possible when an allow key
    /// is replaced by another; adds that only extend never cause one.) Every change is
    /// tried; the first error is returned. A full map is [`Error::MapFull`], counted in
    /// `status`.
    pub fn apply_policy_diff(
        &self,
        endpoint: u16,
        adds: &[(MapKey, EntryValue)],
        deletes: &[MapKey],
    ) -> Result<(), Error> {
        let mut inner = self.lock();
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<(), Error>| {
            if let Err(e) = r {
                let e = self.full(e);
                if first.is_none() {
                    first = Some(e);
                }
            }
        };
        let del: Vec<FullKey> = deletes
            .iter()
            .filter_map(|k| match full_key(endpoint, k) {
                Ok(fk) => Some(fk),
                Err(e) => {
                    keep(Err(e));
                    None
                }
            })
            .collect();
        let add: Vec<(FullKey, EntryValue)> = adds
            .iter()
            .filter_map(|(k, v)| match full_key(endpoint, k) {
                Ok(fk) => Some((fk, *v)),
                Err(e) => {
                    keep(Err(e));
                    None
                }
            })
            .collect();
        let is_deny = |inner: &Inner, fk: &FullKey| {
            inner
                .policy
                .get(fk)
                .is_some_and(|v| v.flags & c::POLICY_FLAG_DENY != 0)
        };
        let allow_deletes: Vec<&FullKey> = del.iter().filter(|fk| !is_deny(&inner, fk)).collect();
        for fk in allow_deletes {
            keep(inner.delete_entry(fk));
        }
        for (fk, v) in add.iter().filter(|(_, v)| v.deny) {
            keep(inner.upsert_entry(fk, v));
        }
        for (fk, v) in add.iter().filter(|(_, v)| !v.deny) {
            keep(inner.upsert_entry(fk, v));
        }
        for fk in del.iter() {
            if inner.policy.contains_key(fk) {
                keep(inner.delete_entry(fk));
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`BpfDatapath::apply_policy_diff`] for a diff of the policy engine.
    pub fn apply_map_diff(&self, endpoint: u16, diff: &MapDiff) -> Result<(), Error> {
        let adds: Vec<(MapKey, EntryValue)> = diff
            .adds
            .iter()
            .map(|(k, e)| {
                (
                    *k,
                    EntryValue {
                        deny: e.deny,
                        proxy_port: if e.deny { 0 } else { e.proxy_port },
                    },
                )
            })
            .collect();
        self.apply_policy_diff(endpoint, &adds, &diff.deletes)
    }

    /// Makes the endpoint's kernel policy map equal `desired` (a restarted agent's computed
    /// state against adopted maps): only the differences are written, in the order of
    /// [`BpfDatapath::apply_policy_diff`], so traffic that both states allow never sees a
    /// gap. Returns the number of entries written and deleted.
    pub fn reconcile_policy(
        &self,
        endpoint: u16,
        desired: &[(MapKey, EntryValue)],
    ) -> Result<(usize, usize), Error> {
        let mut want: HashMap<FullKey, EntryValue> = HashMap::with_capacity(desired.len());
        for (k, v) in desired {
            want.insert(full_key(endpoint, k)?, *v);
        }
        let (adds, deletes) = {
            let inner = self.lock();
            let mut adds = Vec::new();
            for (fk, v) in &want {
                let same = inner.policy.get(fk).is_some_and(|cur| {
                    (cur.flags & c::POLICY_FLAG_DENY != 0) == v.deny
                        && cur.proxy_port == if v.deny { 0 } else { v.proxy_port }
                });
                if !same {
                    adds.push((map_key(fk).1, *v));
                }
            }
            let deletes: Vec<MapKey> = inner
                .policy
                .keys()
                .filter(|fk| fk.1.endpoint_id == endpoint && !want.contains_key(fk))
                .map(|fk| map_key(fk).1)
                .collect();
            (adds, deletes)
        };
        self.apply_policy_diff(endpoint, &adds, &deletes)?;
        Ok((adds.len(), deletes.len()))
    }

    /// Makes the kernel ipcache equal `desired`: upserts of new or changed prefixes first,
    /// then deletes of stale ones. Call after reconciling the policy maps.
    pub fn reconcile_ipcache(&self, desired: &[(IpNet, u32)]) -> Result<(usize, usize), Error> {
        let current: HashMap<IpNet, u32> = self.ipcache_entries()?.into_iter().collect();
        let want: HashMap<IpNet, u32> = desired.iter().map(|(n, id)| (n.trunc(), *id)).collect();
        let mut upserts = 0;
        for (n, id) in &want {
            if current.get(n) != Some(id) {
                self.upsert_ipcache(*n, *id)?;
                upserts += 1;
            }
        }
        let mut deletes = 0;
        for n in current.keys() {
            if !want.contains_key(n) {
                self.delete_ipcache(*n)?;
                deletes += 1;
            }
        }
        Ok((upserts, deletes))
    }

    /// Removes every policy entry of an endpoint (it is gone).
    pub fn flush_endpoint_policy(&self, endpoint: u16) -> Result<(), Error> {
        let mut inner = self.lock();
        let keys: Vec<FullKey> = inner
            .policy
            .keys()
            .filter(|(_, k)| k.endpoint_id == endpoint)
            .copied()
            .collect();
        let mut first = None;
        for fk in keys {
            if let Err(e) = inner.delete_entry(&fk) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The endpoint's policy map as the kernel holds it, with counters (read from the map).
    pub fn policy_entries(&self, endpoint: u16) -> Result<Vec<PolicyRow>, Error> {
        let inner = self.lock();
        let mut rows = Vec::new();
        let mut entries: Vec<(FullKey, c::PolicyValue)> = Vec::new();
        for item in inner.maps.policy.iter() {
            let (k, v) = item.map_err(|source| Error::Map {
                map: names::POLICY,
                source,
            })?;
            entries.push(((k.prefix_len(), k.data()), v));
        }
        for item in inner.maps.policy_exact.iter() {
            let (k, v) = item.map_err(|source| Error::Map {
                map: names::POLICY_EXACT,
                source,
            })?;
            entries.push(((c::POLICY_PREFIX_EXACT, k), v));
        }
        for (fk, v) in entries {
            if fk.1.endpoint_id != endpoint {
                continue;
            }
            let (_, key) = map_key(&fk);
            let (packets, bytes) = inner.stats(v.stats_index)?;
            rows.push(PolicyRow {
                key,
                value: EntryValue {
                    deny: v.flags & c::POLICY_FLAG_DENY != 0,
                    proxy_port: v.proxy_port,
                },
                packets,
                bytes,
            });
        }
        rows.sort_by_key(|r| r.key);
        Ok(rows)
    }

    /// Endpoint ids that have policy entries.
    pub fn policy_endpoints(&self) -> Vec<u16> {
        let inner = self.lock();
        let mut v: Vec<u16> = inner.policy.keys().map(|(_, k)| k.endpoint_id).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Total policy entries over all endpoints.
    pub fn policy_len(&self) -> usize {
        self.lock().policy.len()
    }

    /// Maps a prefix to an identity (/32 and /128 go to the exact-match hash).
    pub fn upsert_ipcache(&self, prefix: IpNet, identity: u32) -> Result<(), Error> {
        let v = c::IpcacheValue { identity, _pad: 0 };
        let mut inner = self.lock();
        let caps = inner.caps;
        // The tries take `&Key`; the hashes would take the key by value too.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let (slot, new, r) = with_ipcache_map!(inner.maps, prefix, |slot, map, key| {
            (slot, map.get(&key, 0).is_err(), map.insert(&key, v, 0))
        });
        r.map_err(|e| {
            self.full(error::map_err(
                IPCACHE_MAPS[slot],
                caps.ipcache_capacity(slot),
                e,
            ))
        })?;
        if new {
            inner.ipcache_counts[slot] += 1;
        }
        Ok(())
    }

    /// Removes a prefix (absent: nothing to do).
    pub fn delete_ipcache(&self, prefix: IpNet) -> Result<(), Error> {
        let mut inner = self.lock();
        let (slot, r) = with_ipcache_map!(inner.maps, prefix, |slot, map, key| {
            (slot, map.remove(&key))
        });
        match r {
            Ok(()) => {
                inner.ipcache_counts[slot] = inner.ipcache_counts[slot].saturating_sub(1);
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(Error::Map {
                map: IPCACHE_MAPS[slot],
                source,
            }),
        }
    }

    /// The ipcache as the kernel holds it.
    pub fn ipcache_entries(&self) -> Result<Vec<(IpNet, u32)>, Error> {
        let inner = self.lock();
        let m = &inner.maps;
        let mut out = Vec::new();
        let v4 = |addr: [u8; 4], len| (IpAddr::from(addr), len);
        let v6 = |addr: [u8; 16], len| (IpAddr::from(addr), len);
        collect_ipcache(&mut out, 0, m.ip4x.iter(), |k| v4(k.addr, 32))?;
        collect_ipcache(&mut out, 1, m.ip4.iter(), |k| {
            v4(k.data().addr, k.prefix_len() as u8)
        })?;
        collect_ipcache(&mut out, 2, m.ip6x.iter(), |k| v6(k.addr, 128))?;
        collect_ipcache(&mut out, 3, m.ip6.iter(), |k| {
            v6(k.data().addr, k.prefix_len() as u8)
        })?;
        out.sort();
        Ok(out)
    }

    /// Live tracked connections (expired entries that the LRU has not reclaimed yet are
    /// left out).
    pub fn connections(&self) -> Result<Vec<Connection>, Error> {
        let inner = self.lock();
        let now = monotonic_ns();
        let mut out = Vec::new();
        // When the kernel evicts the key an iteration stands on, the next step starts over
        // from the first key: skip what was seen and bound the walk, so a busy table cannot
        // keep the dump going.
        let mut seen = std::collections::HashSet::new();
        let limit = 2 * inner.caps.ct as usize;
        for (steps, item) in inner.maps.ct.iter().enumerate() {
            if steps >= limit {
                break;
            }
            let (k, v) = match item {
                Ok(kv) => kv,
                // The LRU may drop the key we iterate from; what was read stays valid.
                Err(e) if is_not_found(&e) => break,
                Err(source) => {
                    return Err(Error::Map {
                        map: names::CT,
                        source,
                    })
                }
            };
            if v.expires_ns <= now || !seen.insert(k) {
                continue;
            }
            let fam = if k.flags & c::CT_KEY_V6 != 0 { 6 } else { 4 };
            let egress = k.flags & c::CT_KEY_EGRESS != 0;
            let src = events::addr(fam, &k.saddr);
            let dst = events::addr(fam, &k.daddr);
            out.push(Connection {
                endpoint: k.endpoint_id,
                direction: if egress {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                protocol: k.protocol,
                src,
                src_port: k.sport,
                dst,
                dst_port: k.dport,
                remote: if egress { dst } else { src },
                remote_identity: v.remote_identity,
                expires_in_secs: (v.expires_ns - now) / 1_000_000_000,
                replied: v.flags & c::CT_FLAG_SEEN_REPLY != 0,
                closing: v.flags & (c::CT_FLAG_RST | c::CT_FLAG_FIN_FWD | c::CT_FLAG_FIN_REV) != 0,
                audit: v.flags & c::CT_FLAG_AUDIT != 0,
                proxy_port: v.proxy_port,
            });
        }
        Ok(out)
    }

    /// Every (endpoint, peer) pair with a live connection that is not closing, from one dump
    /// of the table: a snapshot for the FQDN cache's zombie checks.
    pub fn live_peers(&self) -> Result<std::collections::HashSet<(u16, IpAddr)>, Error> {
        Ok(self
            .connections()?
            .into_iter()
            .filter(|c| !c.closing)
            .map(|c| (c.endpoint, c.remote))
            .collect())
    }

    /// Whether `endpoint` has a live connection with `ip` (the FQDN cache keeps an expired
    /// IP while one is open). A connection whose TCP close is under way counts as ended.
    pub fn is_connection_alive(&self, endpoint: u16, ip: IpAddr) -> bool {
        match self.connections() {
            Ok(conns) => conns
                .iter()
                .any(|c| c.endpoint == endpoint && c.remote == ip && !c.closing),
            // Unreadable table: keep the IP (a wrongly kept allow ends with the connection's
            // next check; a wrongly dropped one breaks a live connection).
            Err(_) => true,
        }
    }

    /// Takes the event stream (once; requires a tokio runtime).
    pub fn events(&self) -> Result<EventStream, Error> {
        let ring = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(Error::EventsTaken)?;
        EventStream::new(ring).map_err(|e| Error::io("registering the ring buffer", e))
    }

    /// Kernel counters by name, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, Error> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (i, name) in c::counter::NAMES.iter().enumerate() {
            // An adopted map of an older build may lack the newest counters: they read 0.
            let v = match inner.maps.counters.get(&(i as u32), 0) {
                Ok(v) => v.iter().sum(),
                Err(MapError::OutOfBounds { .. }) => 0,
                Err(source) => {
                    return Err(Error::Map {
                        map: names::COUNTERS,
                        source,
                    })
                }
            };
            out.push((*name, v));
        }
        Ok(out)
    }

    /// Attached programs, map pressure and counters.
    pub fn status(&self) -> Result<Status, Error> {
        let counters = self.counters()?;
        let inner = self.lock();
        let ct_entries = inner.maps.ct.keys().filter(|k| k.is_ok()).count() as u64;
        let caps = inner.caps;
        let mut maps = vec![
            MapPressure {
                name: names::ENDPOINTS,
                entries: inner.attachments.len() as u64,
                capacity: caps.endpoints,
            },
            MapPressure {
                name: names::POLICY,
                entries: inner.policy.len() as u64,
                capacity: caps.policy,
            },
        ];
        maps.extend(
            IPCACHE_MAPS
                .iter()
                .enumerate()
                .map(|(slot, &name)| MapPressure {
                    name,
                    entries: inner.ipcache_counts[slot],
                    capacity: caps.ipcache_capacity(slot),
                }),
        );
        maps.push(MapPressure {
            name: names::CT,
            entries: ct_entries,
            capacity: caps.ct,
        });
        Ok(Status {
            pin_dir: self.pin_dir.clone(),
            adopted: self.adopted,
            attachments: inner
                .attachments
                .values()
                .map(|a| {
                    let mut a = a.clone();
                    for (i, ingress) in [true, false].into_iter().enumerate() {
                        let path = link_path(&self.pin_dir, a.ifindex, ingress);
                        a.program_ids[i] = sys::obj_get(&path)
                            .and_then(|fd| sys::link_prog_id(fd.as_fd()))
                            .unwrap_or(0);
                    }
                    a
                })
                .collect(),
            maps,
            counters,
            map_full_errors: self.map_full_errors.load(Ordering::Relaxed),
        })
    }

    /// Detaches every program and removes every pin: enforcement stops.
    pub fn unload(self) -> Result<(), Error> {
        let ifindexes: Vec<u32> = self.lock().attachments.keys().copied().collect();
        for i in ifindexes {
            let _ = self.detach(i);
        }
        let pin = self.pin_dir.clone();
        drop(self);
        remove_pins(&pin)
    }

    /// A program's file descriptor holder, for BPF_PROG_TEST_RUN ([`testrun`]).
    pub(crate) fn with_program<R>(
        &self,
        name: &'static str,
        f: impl FnOnce(&SchedClassifier) -> R,
    ) -> Result<R, Error> {
        Ok(f(self.lock().program(name)?))
    }
}

/// Removes every pin under `pin_dir` (links first, which detaches the programs, then maps)
/// without loading anything: `fqdnwall` cleanup, or a leftover of a crashed test.
pub fn remove_pins(pin_dir: &Path) -> Result<(), Error> {
    for d in [links_dir(pin_dir), maps_dir(pin_dir)] {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                std::fs::remove_file(e.path())
                    .map_err(|err| Error::io(format!("removing {}", e.path().display()), err))?;
            }
        }
        let _ = std::fs::remove_dir(&d);
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(())
}

fn static_prog(name: &str) -> &'static str {
    [
        prog_names::FROM_ENDPOINT,
        prog_names::TO_ENDPOINT,
        prog_names::HOST_INGRESS,
        prog_names::HOST_EGRESS,
    ]
    .into_iter()
    .find(|n| *n == name)
    .unwrap_or("unknown")
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl Inner {
    fn write_config(&mut self, cfg: &DatapathConfig) -> Result<(), Error> {
        let mut flags = 0;
        if cfg.audit {
            flags |= c::CONFIG_FLAG_AUDIT;
        }
        if cfg.verdict_events {
            flags |= c::CONFIG_FLAG_VERDICT_EVENTS;
        }
        let v = c::Config {
            dns_proxy_port: cfg.dns_proxy_port,
            _pad0: 0,
            proxy_mark: cfg.proxy_mark,
            proxy_out_mark: cfg.proxy_out_mark,
            proxy_mark_mask: cfg.proxy_mark_mask,
            flags,
            _pad1: 0,
        };
        self.maps.config.set(0, v, 0).map_err(|source| Error::Map {
            map: names::CONFIG,
            source,
        })
    }

    /// Rebuilds bookkeeping from the (possibly adopted) maps and link pins.
    fn rebuild(&mut self, pin: &Path) -> Result<(), Error> {
        let mut used = vec![false; self.caps.policy as usize];
        for item in self.maps.policy.iter() {
            let (k, v) = item.map_err(|source| Error::Map {
                map: names::POLICY,
                source,
            })?;
            if let Some(u) = used.get_mut(v.stats_index as usize) {
                *u = true;
            }
            self.policy.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.maps.policy_exact.iter() {
            let (k, v) = item.map_err(|source| Error::Map {
                map: names::POLICY_EXACT,
                source,
            })?;
            if let Some(u) = used.get_mut(v.stats_index as usize) {
                *u = true;
            }
            self.policy.insert((c::POLICY_PREFIX_EXACT, k), v);
        }
        for fk in self.policy.keys() {
            let bit = presence_bit(fk).trailing_zeros() as usize;
            self.id_counts.entry(id_key(fk)).or_insert([0; 16])[bit] += 1;
        }
        // The presence map follows the entries (it may be new next to adopted entries).
        let stale: Vec<c::PolicyIdKey> = self
            .maps
            .policy_ids
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !self.id_counts.contains_key(k))
            .collect();
        for (k, counts) in &self.id_counts {
            let cap = self.caps.policy;
            self.maps
                .policy_ids
                .insert(*k, mask_of(counts), 0)
                .map_err(|e| error::map_err(names::POLICY_IDS, cap, e))?;
        }
        for k in stale {
            let _ = self.maps.policy_ids.remove(&k);
        }
        self.free_slots = (0..self.caps.policy)
            .rev()
            .filter(|i| !used[*i as usize])
            .collect();
        self.ipcache_counts = [
            self.maps.ip4x.keys().filter(|k| k.is_ok()).count() as u64,
            self.maps.ip4.keys().filter(|k| k.is_ok()).count() as u64,
            self.maps.ip6x.keys().filter(|k| k.is_ok()).count() as u64,
            self.maps.ip6.keys().filter(|k| k.is_ok()).count() as u64,
        ];
        let mut eps = Vec::new();
        for item in self.maps.endpoints.iter() {
            let (ifindex, info) = item.map_err(|source| Error::Map {
                map: names::ENDPOINTS,
                source,
            })?;
            eps.push((ifindex, info));
        }
        for (ifindex, info) in eps {
            // An interface of another namespace (or one being deleted) has no name here; its
            // record and links stay: only `detach`/`unload` remove enforcement.
            let name = ifname(ifindex).unwrap_or_else(|_| format!("if{ifindex}"));
            let flags = info.flags;
            self.attachments.insert(
                ifindex,
                Attachment {
                    program_ids: [0; 2],
                    ifindex,
                    ifname: name,
                    kind: if flags & c::EP_FLAG_HOST != 0 {
                        AttachKind::Host
                    } else {
                        AttachKind::Endpoint
                    },
                    endpoint: EndpointSpec {
                        id: info.endpoint_id,
                        identity: info.identity,
                        flags: EndpointFlags {
                            audit: flags & c::EP_FLAG_AUDIT != 0,
                            enforce_ingress: flags & c::EP_FLAG_ENFORCE_INGRESS != 0,
                            enforce_egress: flags & c::EP_FLAG_ENFORCE_EGRESS != 0,
                        },
                    },
                },
            );
            for ingress in [true, false] {
                let path = link_path(pin, ifindex, ingress);
                if path.exists() {
                    let link = PinnedLink::from_pin(&path).map_err(|e| Error::Link {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                    self.links.insert((ifindex, ingress), link);
                }
            }
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        prog: &'static str,
        ifname: &str,
        ingress: bool,
        path: &Path,
    ) -> Result<PinnedLink, Error> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog)
            .ok_or_else(|| Error::Command(format!("program {prog} missing")))?
            .try_into()
            .map_err(|source| Error::Program {
                program: prog,
                source,
            })?;
        let hook = if ingress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let id = p.attach(ifname, hook).map_err(|source| Error::Program {
            program: prog,
            source,
        })?;
        let link = p.take_link(id).map_err(|source| Error::Program {
            program: prog,
            source,
        })?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| Error::Link {
                path: path.to_path_buf(),
                message: format!("not a TCX link (kernel without TCX?): {e}"),
            })?;
        let _ = std::fs::remove_file(path);
        fd.pin(path).map_err(|e| Error::Link {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The loaded tc program called `name`.
    fn program(&self, name: &'static str) -> Result<&SchedClassifier, Error> {
        self.ebpf
            .program(name)
            .ok_or_else(|| Error::Command(format!("program {name} missing")))?
            .try_into()
            .map_err(|source| Error::Program {
                program: name,
                source,
            })
    }

    fn prog_id(&self, name: &'static str) -> Result<u32, Error> {
        let p = self.program(name)?;
        let info = p.info().map_err(|source| Error::Program {
            program: name,
            source,
        })?;
        Ok(info.id())
    }

    fn update_link(&mut self, prog: &'static str, path: &Path) -> Result<(), Error> {
        let p = self.program(prog)?;
        let pfd = p.fd().map_err(|source| Error::Program {
            program: prog,
            source,
        })?;
        let link =
            sys::obj_get(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        sys::link_update(link.as_fd(), pfd.as_fd())
            .map_err(|e| Error::io(format!("replacing the program of {}", path.display()), e))
    }

    fn stats(&self, slot: u32) -> Result<(u64, u64), Error> {
        if slot == c::STATS_NONE {
            return Ok((0, 0));
        }
        let v = self
            .maps
            .policy_stats
            .get(&slot, 0)
            .map_err(|source| Error::Map {
                map: names::POLICY_STATS,
                source,
            })?;
        Ok(v.iter()
            .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes)))
    }

    fn upsert_entry(&mut self, fk: &FullKey, v: &EntryValue) -> Result<(), Error> {
        let prefix_len = (fk.0 - c::POLICY_PREFIX_FIXED) as u8;
        let existing = self.policy.get(fk).copied();
        let slot = match existing {
            Some(e) => e.stats_index,
            None => {
                let slot = self.free_slots.pop().ok_or(Error::MapFull {
                    map: names::POLICY,
                    capacity: self.caps.policy,
                })?;
                // A fresh entry starts from zero.
                let zero = PerCpuValues::try_from(vec![c::PolicyStats::default(); self.nr_cpus])
                    .map_err(|e| Error::io("per-CPU values", e))?;
                if let Err(source) = self.maps.policy_stats.set(slot, zero, 0) {
                    self.free_slots.push(slot);
                    return Err(Error::Map {
                        map: names::POLICY_STATS,
                        source,
                    });
                }
                slot
            }
        };
        let value = c::PolicyValue {
            flags: if v.deny { c::POLICY_FLAG_DENY } else { 0 },
            prefix_len,
            proxy_port: if v.deny { 0 } else { v.proxy_port },
            stats_index: slot,
        };
        if existing == Some(value) {
            return Ok(());
        }
        if existing.is_none() {
            // Presence before the entry: a lookup must never skip an entry that exists.
            if let Err(e) = self.count_presence(fk, true) {
                self.free_slots.push(slot);
                return Err(e);
            }
        }
        let (map, r) = if fk.0 == c::POLICY_PREFIX_EXACT {
            (
                names::POLICY_EXACT,
                self.maps.policy_exact.insert(fk.1, value, 0),
            )
        } else {
            (
                names::POLICY,
                self.maps.policy.insert(&Key::new(fk.0, fk.1), value, 0),
            )
        };
        match r {
            Ok(()) => {
                self.policy.insert(*fk, value);
                Ok(())
            }
            Err(e) => {
                if existing.is_none() {
                    self.free_slots.push(slot);
                    let _ = self.count_presence(fk, false);
                }
                Err(error::map_err(map, self.caps.policy, e))
            }
        }
    }

    fn delete_entry(&mut self, fk: &FullKey) -> Result<(), Error> {
        let (map, r) = if fk.0 == c::POLICY_PREFIX_EXACT {
            (names::POLICY_EXACT, self.maps.policy_exact.remove(&fk.1))
        } else {
            (
                names::POLICY,
                self.maps.policy.remove(&Key::new(fk.0, fk.1)),
            )
        };
        match r {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(source) => return Err(Error::Map { map, source }),
        }
        if let Some(v) = self.policy.remove(fk) {
            self.free_slots.push(v.stats_index);
            // The entry is gone; now its presence bit may go.
            self.count_presence(fk, false)?;
        }
        Ok(())
    }

    /// Counts an entry in or out of its (endpoint, direction, identity) presence mask and
    /// writes the mask when it changes.
    fn count_presence(&mut self, fk: &FullKey, add: bool) -> Result<(), Error> {
        let k = id_key(fk);
        let bit = presence_bit(fk).trailing_zeros() as usize;
        let counts = self.id_counts.entry(k).or_insert([0; 16]);
        let before = mask_of(counts);
        if add {
            counts[bit] += 1;
        } else {
            counts[bit] = counts[bit].saturating_sub(1);
        }
        let after = mask_of(counts);
        if after == 0 {
            self.id_counts.remove(&k);
        }
        if before == after {
            return Ok(());
        }
        let cap = self.caps.policy;
        if after == 0 {
            match self.maps.policy_ids.remove(&k) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(source) => Err(Error::Map {
                    map: names::POLICY_IDS,
                    source,
                }),
            }
        } else {
            let r = self
                .maps
                .policy_ids
                .insert(k, after, 0)
                .map_err(|e| error::map_err(names::POLICY_IDS, cap, e));
            if r.is_err() && add {
                // Undo the count: the entry will not be inserted.
                if let Some(c) = self.id_counts.get_mut(&k) {
                    c[bit] -= 1;
                }
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The agent shares one datapath between its tasks.
    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<BpfDatapath>();
        const fn send<T: Send>() {}
        send::<EventStream>();
    };

    fn k(identity: u32, protocol: u8, port: u16, prefix_len: u8) -> MapKey {
        MapKey {
            identity,
            direction: Direction::Egress,
            protocol,
            port,
            prefix_len,
        }
    }

    #[test]
    fn policy_keys_round_trip_and_are_checked() {
        for key in [
            k(0, 0, 0, 0),
            k(300, 6, 8080, 16),
            k(1 << 24 | 5, 17, 8064, 10),
            k(9, 1, 8, 16),
        ] {
            let fk = full_key(7, &key).unwrap();
            assert_eq!(fk.0, c::POLICY_PREFIX_FIXED + u32::from(key.prefix_len));
            assert_eq!(map_key(&fk), (7, key));
        }
        assert!(matches!(
            full_key(7, &k(300, 6, 8080, 17)),
            Err(Error::InvalidEntry { endpoint: 7, .. })
        ));
        // 8065 has a bit below a /10 port prefix.
        assert!(full_key(7, &k(300, 6, 8065, 10)).is_err());
    }

    #[test]
    fn presence_masks() {
        let mut counts = [0u32; 16];
        assert_eq!(mask_of(&counts), 0);
        counts[c::proto_bit(6).trailing_zeros() as usize] = 2;
        counts[c::proto_bit(0).trailing_zeros() as usize] = 1;
        assert_eq!(mask_of(&counts), c::proto_bit(6) | c::proto_bit(0));
        counts[c::exact_bit(17).trailing_zeros() as usize] = 1;
        assert_eq!(
            mask_of(&counts),
            c::proto_bit(6) | c::proto_bit(0) | c::exact_bit(17)
        );
        assert_eq!(
            c::proto_bit(47),
            c::proto_bit(50),
            "rare protocols share a bit"
        );
    }

    #[test]
    fn events_decode() {
        let mut e = c::Event {
            kind: c::EVENT_DROP,
            reason: c::REASON_POLICY_DENY,
            direction: c::DIR_INGRESS,
            family: 6,
            protocol: 6,
            match_kind: c::MATCH_IDENTITY,
            endpoint_id: 3,
            ifindex: 9,
            remote_identity: 300,
            len: 60,
            sport: 1234,
            dport: 80,
            key_identity: 300,
            key_port: 80,
            key_protocol: 6,
            key_prefix: 16,
            ..Default::default()
        };
        e.saddr[15] = 1;
        e.daddr[0] = 0xfd;
        // SAFETY: Event is plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(&e as *const c::Event as *const u8, size_of::<c::Event>())
        };
        let d = events::decode(bytes).unwrap();
        assert_eq!(d.kind, EventKind::Drop);
        assert_eq!(d.reason, Reason::PolicyDeny);
        assert_eq!(d.direction, Direction::Ingress);
        assert_eq!(d.src, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(d.dst, "fd00::".parse::<IpAddr>().unwrap());
        assert_eq!(
            d.matched,
            Some(MatchedEntry {
                identity: 300,
                protocol: 6,
                port: 80,
                prefix_len: 16
            })
        );
        assert!(events::decode(&bytes[..10]).is_none());
    }
}
