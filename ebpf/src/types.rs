//! The plain types of the datapath API.

use std::net::IpAddr;
use std::path::PathBuf;

use ebpf_common::capacity;
use policy::mapstate::MapKey;
use policy::model::Direction;

/// Where the pins live unless the caller says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/fqdnwall";

/// Map sizes. They take effect when the maps are created; adopted (pinned) maps keep the
/// sizes they were created with, and `status` reports those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    /// Policy entries over all endpoints (also the number of counter slots).
    pub policy: u32,
    /// ipcache prefixes other than /32 and /128, per family.
    pub ipcache_lpm: u32,
    /// ipcache /32 and /128 entries, per family.
    pub ipcache_exact: u32,
    /// Tracked connections (LRU: the least recently used entry makes room).
    pub conntrack: u32,
    /// Ring buffer bytes (a power of two, at least a page).
    pub events_bytes: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            endpoints: capacity::ENDPOINTS,
            policy: capacity::POLICY,
            ipcache_lpm: capacity::IPCACHE_LPM,
            ipcache_exact: capacity::IPCACHE_EXACT,
            conntrack: capacity::CT,
            events_bytes: capacity::EVENTS_BYTES,
        }
    }
}

/// Global datapath settings (rewritten on every load; `set_config` changes them live).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// DNS proxy port: endpoint DNS (TCP and UDP port 53) that policy allows goes to the
    /// socket listening there. 0 = no interception.
    pub dns_proxy_port: u16,
    /// Mark put on packets steered to a proxy. A rule `fwmark proxy_mark lookup T` with
    /// local routes in table T must exist ([`crate::ProxyRouting`] installs them).
    pub proxy_mark: u32,
    /// Mark (under `proxy_mark_mask`) that our proxies put on their own upstream traffic; such
    /// packets are never steered to a proxy again.
    pub proxy_out_mark: u32,
    pub proxy_mark_mask: u32,
    /// Audit mode for every endpoint.
    pub audit: bool,
    /// Report every new allowed connection (policy-verdict events), not only drops/audits.
    pub verdict_events: bool,
}

/// What to load and where to pin it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    pub config: DatapathConfig,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            capacities: Capacities::default(),
            config: DatapathConfig::default(),
        }
    }
}

/// How an endpoint's interface is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointFlags {
    /// Would-be drops pass and are reported as audit events.
    pub audit: bool,
    /// Ingress policy enforced; when false everything may come in (connections still tracked).
    pub enforce_ingress: bool,
    pub enforce_egress: bool,
}

/// One endpoint (or the host) as the programs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSpec {
    pub id: u16,
    /// Its own security identity (the host: 1).
    pub identity: u32,
    pub flags: EndpointFlags,
}

/// The kind of interface programs are attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    /// The host side of an endpoint's veth: tc ingress = the endpoint's egress.
    Endpoint,
    /// A host interface (host firewall): tc ingress = the host's ingress.
    Host,
}

/// The value part of a policy entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryValue {
    pub deny: bool,
    /// 0 = no redirect.
    pub proxy_port: u16,
}

/// One policy map entry as the kernel holds it, with its counters summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    pub key: MapKey,
    pub value: EntryValue,
    pub packets: u64,
    pub bytes: u64,
}

/// A tracked connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub endpoint: u16,
    /// The direction of the endpoint the connection was opened in.
    pub direction: Direction,
    pub protocol: u8,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    /// The peer (the destination of an egress connection, the source of an ingress one).
    pub remote: IpAddr,
    pub remote_identity: u32,
    /// Seconds until it expires without more traffic.
    pub expires_in_secs: u64,
    pub replied: bool,
    pub closing: bool,
    /// Allowed only because of audit mode.
    pub audit: bool,
    pub proxy_port: u16,
}

/// One attached interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub ifindex: u32,
    pub ifname: String,
    pub kind: AttachKind,
    pub endpoint: EndpointSpec,
    /// Kernel ids of the programs on its ingress and egress hooks (in `status`; 0 unknown).
    pub program_ids: [u32; 2],
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPressure {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// What `status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub pin_dir: PathBuf,
    /// The pinned state existed when this loader started (enforcement was running).
    pub adopted: bool,
    pub attachments: Vec<Attachment>,
    pub maps: Vec<MapPressure>,
    /// Kernel counters by name (summed over CPUs).
    pub counters: Vec<(&'static str, u64)>,
    /// Map updates refused because a map was full, since this loader started.
    pub map_full_errors: u64,
}
