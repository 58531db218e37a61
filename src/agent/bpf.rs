//! The eBPF datapath behind the agent's [`Datapath`] trait: the engine's changes become
//! kernel map updates, the kernel's conntrack feeds the FQDN cache's zombies, and its events
//! feed `monitor`.
//!
//! Start-up has two phases so that a restart never opens a window of wrong verdicts:
//! - **staging**: while the agent rebuilds its state (endpoints, policies, learned names) the
//!   changes only go to an in-memory copy; the kernel keeps enforcing what it had (the pinned
//!   maps of the previous run, or nothing on a first start);
//! - [`KernelDatapath::go_live`] then makes the kernel maps equal that copy with the
//!   reconcile calls (only differences written: policy entries first, ipcache after), attaches
//!   the programs to the endpoints' and the host's interfaces, detaches interfaces that are no
//!   longer configured, and from then on every change goes to the kernel as it comes.
//!
//! Within one engine change the order is: policy map adds, ipcache upserts, ipcache deletes,
//! policy map deletes. An IP never points at an identity whose allows are not in place, and a
//! deny entry never goes before the IP that needed it has left the ipcache.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ebpf::{
    AttachKind, BpfDatapath, DatapathConfig, EndpointFlags, EndpointSpec, EventKind, EventStream,
    LoadOptions, ProxyRouting,
};
use ipnet::IpNet;
use policy::engine::Changes;
use policy::mapstate::MapKey;
use policy::model::Direction;

use super::datapath::{Applied, Datapath, MapRow, MemoryDatapath};
use super::events::Event;
use super::Agent;
use crate::view::{BpfAttachmentView, BpfMapView, BpfStatusView};

/// Environment variable naming the bpffs directory of the pins (default
/// `/sys/fs/bpf/fqdnwall`); tests and side-by-side agents use their own.
pub const PIN_DIR_ENV: &str = "FQDNWALL_BPF_PIN_DIR";

/// Marks and routing of proxy steering. The programs put `mark` on packets they hand to a
/// local proxy socket; the routing rule for that mark delivers them locally. The proxies mark
/// their own upstream traffic with `out_mark`, which is never steered again.
#[derive(Debug, Clone, Copy)]
pub struct Marks {
    pub mark: u32,
    pub out_mark: u32,
    pub mask: u32,
    pub routing: ProxyRouting,
}

/// The marks of `fqdnwall run`.
pub const AGENT_MARKS: Marks = Marks {
    mark: 0x0a00,
    out_mark: 0x0b00,
    mask: 0x0f00,
    routing: ProxyRouting {
        mark: 0x0a00,
        mask: 0x0f00,
        table: 2051,
        priority: 2051,
    },
};

/// The marks of `fqdnwall lockdown`: its own, so that it can run (and clean up) next to an
/// agent without touching the agent's routing.
pub const LOCKDOWN_MARKS: Marks = Marks {
    mark: 0x0c00,
    out_mark: 0x0d00,
    mask: 0x0f00,
    routing: ProxyRouting {
        mark: 0x0c00,
        mask: 0x0f00,
        table: 2052,
        priority: 2052,
    },
};

pub fn pin_dir() -> PathBuf {
    std::env::var_os(PIN_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ebpf::DEFAULT_PIN_DIR))
}

/// One interface the programs go on.
#[derive(Debug, Clone)]
pub struct Interface {
    pub ifname: String,
    pub kind: AttachKind,
    pub endpoint: u16,
    pub identity: u32,
}

struct Live {
    live: bool,
    interfaces: Vec<Interface>,
    audit: BTreeMap<u16, bool>,
    config: DatapathConfig,
}

pub struct KernelDatapath {
    dp: BpfDatapath,
    /// What the agent computed; during staging the only copy, afterwards a mirror.
    desired: MemoryDatapath,
    state: Mutex<Live>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl KernelDatapath {
    /// Loads the programs or adopts the pinned ones (enforcement of a previous run goes on
    /// unchanged until [`KernelDatapath::go_live`]).
    pub fn load(config: DatapathConfig) -> Result<KernelDatapath, ebpf::Error> {
        let opts = LoadOptions {
            pin_dir: pin_dir(),
            config,
            ..LoadOptions::default()
        };
        let dp = BpfDatapath::load_or_adopt(&opts)?;
        Ok(KernelDatapath {
            dp,
            desired: MemoryDatapath::new(),
            state: Mutex::new(Live {
                live: false,
                interfaces: Vec::new(),
                audit: BTreeMap::new(),
                config,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Live> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inner(&self) -> &BpfDatapath {
        &self.dp
    }

    /// The DNS proxy's port once it is bound (0 = no interception).
    pub fn set_dns_proxy_port(&self, port: u16) -> Result<(), ebpf::Error> {
        let mut st = self.lock();
        st.config.dns_proxy_port = port;
        self.dp.set_config(&st.config)
    }

    fn spec(iface: &Interface, audit: bool) -> EndpointSpec {
        // Both directions are always enforced by the kernel: a direction no rule enforces has
        // the engine's allow-all entry in the map, so flags and map never disagree.
        EndpointSpec {
            id: iface.endpoint,
            identity: iface.identity,
            flags: EndpointFlags {
                audit,
                enforce_ingress: true,
                enforce_egress: true,
            },
        }
    }

    fn attach_one(&self, iface: &Interface, audit: bool) -> Result<u32, ebpf::Error> {
        let spec = Self::spec(iface, audit);
        match iface.kind {
            AttachKind::Endpoint => self.dp.attach_endpoint(&iface.ifname, spec),
            AttachKind::Host => self.dp.attach_host(&iface.ifname, spec),
        }
    }

    /// Reconciles the kernel maps with the state computed so far, attaches the programs to
    /// `interfaces`, drops what belongs to endpoints and interfaces that are gone, and
    /// switches to applying every change to the kernel directly.
    ///
    /// On failure, a first start (nothing adopted) removes what it loaded: no half-attached
    /// programs stay behind. An adopted state stays as it was, still enforcing.
    pub fn go_live(&self, interfaces: Vec<Interface>) -> Result<(), String> {
        let r = self.try_go_live(interfaces);
        if r.is_err() && !self.dp.adopted() {
            if let Err(e) = self.unload() {
                tracing::warn!("removing the programs of a failed start: {e}");
            }
        }
        r
    }

    fn try_go_live(&self, interfaces: Vec<Interface>) -> Result<(), String> {
        let mut st = self.lock();
        let wanted: BTreeSet<u16> = interfaces.iter().map(|i| i.endpoint).collect();
        let mut written = 0;
        let mut deleted = 0;
        for ep in &wanted {
            let rows: Vec<(MapKey, ebpf::EntryValue)> = self
                .desired
                .policy_map(*ep)
                .unwrap_or_default()
                .into_iter()
                .map(|r| {
                    (
                        r.key,
                        ebpf::EntryValue {
                            deny: r.entry.deny,
                            proxy_port: if r.entry.deny { 0 } else { r.entry.proxy_port },
                        },
                    )
                })
                .collect();
            let (w, d) = self
                .dp
                .reconcile_policy(*ep, &rows)
                .map_err(|e| format!("policy map of endpoint {ep}: {e}"))?;
            written += w;
            deleted += d;
        }
        let (up, del) = self
            .dp
            .reconcile_ipcache(&self.desired.ipcache())
            .map_err(|e| format!("ipcache: {e}"))?;
        tracing::info!(
            adopted = self.dp.adopted(),
            policy_written = written,
            policy_deleted = deleted,
            ipcache_upserts = up,
            ipcache_deletes = del,
            "kernel maps reconciled with the computed state"
        );
        let mut attached = BTreeSet::new();
        for iface in &interfaces {
            let audit = st.audit.get(&iface.endpoint).copied().unwrap_or(false);
            let idx = self
                .attach_one(iface, audit)
                .map_err(|e| format!("attaching to {}: {e}", iface.ifname))?;
            attached.insert(idx);
            tracing::info!(
                interface = %iface.ifname,
                endpoint = iface.endpoint,
                kind = ?iface.kind,
                "programs attached"
            );
        }
        // A previous run's interfaces that are not configured any more.
        if let Ok(s) = self.dp.status() {
            for a in s.attachments {
                if !attached.contains(&a.ifindex) {
                    tracing::info!(interface = %a.ifname, "detaching an interface no longer configured");
                    let _ = self.dp.detach(a.ifindex);
                }
            }
        }
        for ep in self.dp.policy_endpoints() {
            if !wanted.contains(&ep) {
                let _ = self.dp.flush_endpoint_policy(ep);
            }
        }
        st.interfaces = interfaces;
        st.live = true;
        Ok(())
    }

    /// Stops enforcement: detaches every program and removes the pins (`--unload-on-stop`).
    pub fn unload(&self) -> Result<(), String> {
        let s = self.dp.status().map_err(err)?;
        for a in s.attachments {
            self.dp.detach(a.ifindex).map_err(err)?;
        }
        ebpf::remove_pins(self.dp.pin_dir()).map_err(err)?;
        Ok(())
    }

    fn apply_kernel(&self, changes: &Changes) -> Result<(), String> {
        let mut first: Option<String> = None;
        let mut keep = |r: Result<(), ebpf::Error>, what: &str| {
            if let Err(e) = r {
                first.get_or_insert_with(|| format!("{what}: {e}"));
            }
        };
        // 1. Policy adds (an upsert of an existing key replaces it in place).
        for (ep, diff) in &changes.maps {
            let adds: Vec<(MapKey, ebpf::EntryValue)> = diff
                .adds
                .iter()
                .map(|(k, e)| {
                    (
                        *k,
                        ebpf::EntryValue {
                            deny: e.deny,
                            proxy_port: if e.deny { 0 } else { e.proxy_port },
                        },
                    )
                })
                .collect();
            if !adds.is_empty() {
                keep(
                    self.dp.apply_policy_diff(*ep, &adds, &[]),
                    &format!("policy map of endpoint {ep}"),
                );
            }
        }
        // 2. ipcache upserts, 3. ipcache deletes.
        for (prefix, id) in &changes.ipcache_upserts {
            keep(
                self.dp.upsert_ipcache(*prefix, *id),
                &format!("ipcache {prefix}"),
            );
        }
        for prefix in &changes.ipcache_deletes {
            keep(
                self.dp.delete_ipcache(*prefix),
                &format!("ipcache {prefix}"),
            );
        }
        // 4. Policy deletes (keys re-added by the same diff stay).
        for (ep, diff) in &changes.maps {
            let added: HashSet<&MapKey> = diff.adds.iter().map(|(k, _)| k).collect();
            let dels: Vec<MapKey> = diff
                .deletes
                .iter()
                .filter(|k| !added.contains(k))
                .copied()
                .collect();
            if !dels.is_empty() {
                keep(
                    self.dp.apply_policy_diff(*ep, &[], &dels),
                    &format!("policy map of endpoint {ep}"),
                );
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn status_view(&self) -> Option<BpfStatusView> {
        let s = match self.dp.status() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("reading the datapath status: {e}");
                return None;
            }
        };
        let programs = self.dp.programs().unwrap_or_default();
        Some(BpfStatusView {
            pin_dir: s.pin_dir.display().to_string(),
            adopted: s.adopted,
            programs: programs
                .into_iter()
                .map(|(n, id)| (n.to_string(), id))
                .collect(),
            attachments: s
                .attachments
                .into_iter()
                .map(|a| BpfAttachmentView {
                    interface: a.ifname,
                    ifindex: a.ifindex,
                    kind: match a.kind {
                        AttachKind::Endpoint => "endpoint",
                        AttachKind::Host => "host",
                    }
                    .to_string(),
                    endpoint: a.endpoint.id,
                    identity: a.endpoint.identity,
                    audit: a.endpoint.flags.audit,
                    program_ids: a.program_ids.to_vec(),
                })
                .collect(),
            maps: s
                .maps
                .into_iter()
                .map(|m| BpfMapView {
                    name: m.name.to_string(),
                    entries: m.entries,
                    capacity: m.capacity,
                    pressure: if m.capacity == 0 {
                        0.0
                    } else {
                        m.entries as f64 / m.capacity as f64
                    },
                })
                .collect(),
            counters: s
                .counters
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            map_full_errors: s.map_full_errors,
        })
    }
}

impl Datapath for KernelDatapath {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn apply(&self, changes: &Changes) -> Applied {
        // The state lock orders kernel writes like the engine ordered the changes, and keeps
        // go_live from reconciling in the middle of one.
        let st = self.lock();
        // The in-memory copy is done at once; its future carries nothing.
        drop(self.desired.apply(changes));
        let r = if st.live {
            self.apply_kernel(changes)
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(r))
    }

    fn policy_map(&self, endpoint: u16) -> Option<Vec<MapRow>> {
        let computed = self.desired.policy_map(endpoint)?;
        if !self.lock().live {
            return Some(computed);
        }
        let entries: BTreeMap<MapKey, policy::mapstate::MapEntry> =
            computed.into_iter().map(|r| (r.key, r.entry)).collect();
        match self.dp.policy_entries(endpoint) {
            Ok(rows) => Some(
                rows.into_iter()
                    .map(|r| {
                        // The kernel holds the verdict and proxy port; the rules that made the
                        // entry come from the computed copy.
                        let mut entry = entries.get(&r.key).cloned().unwrap_or_else(|| {
                            policy::mapstate::MapEntry {
                                deny: r.value.deny,
                                proxy_port: r.value.proxy_port,
                                l7: None,
                                rules: Arc::from(Vec::new()),
                            }
                        });
                        entry.deny = r.value.deny;
                        entry.proxy_port = r.value.proxy_port;
                        MapRow {
                            key: r.key,
                            entry,
                            packets: r.packets,
                            bytes: r.bytes,
                        }
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!("reading the policy map of endpoint {endpoint}: {e}");
                None
            }
        }
    }

    fn ipcache(&self) -> Vec<(IpNet, u32)> {
        if !self.lock().live {
            return self.desired.ipcache();
        }
        self.dp.ipcache_entries().unwrap_or_else(|e| {
            tracing::warn!("reading the ipcache: {e}");
            Vec::new()
        })
    }

    fn connections(&self) -> Vec<(u16, IpAddr)> {
        match self.dp.live_peers() {
            Ok(s) => s.into_iter().collect(),
            Err(e) => {
                tracing::warn!("reading conntrack: {e}");
                Vec::new()
            }
        }
    }

    fn policy_entries(&self) -> usize {
        self.dp.policy_len()
    }

    fn set_audit(&self, endpoint: u16, on: bool) {
        let mut st = self.lock();
        st.audit.insert(endpoint, on);
        if !st.live {
            return;
        }
        for iface in st.interfaces.iter().filter(|i| i.endpoint == endpoint) {
            if let Err(e) = self.attach_one(iface, on) {
                tracing::error!("audit mode of {}: {e}", iface.ifname);
            }
        }
    }

    fn kernel_status(&self) -> Option<BpfStatusView> {
        self.status_view()
    }
}

/// Turns kernel events into monitor events until the stream ends.
pub async fn event_loop(agent: Arc<Agent>, mut stream: EventStream) {
    loop {
        let batch = match stream.next_batch().await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("reading kernel events: {e}");
                return;
            }
        };
        if !agent.events.has_subscribers() {
            continue;
        }
        let names: BTreeMap<u16, String> = {
            let st = agent.lock();
            st.engine
                .endpoints()
                .map(|e| (e.id, e.name.clone()))
                .collect()
        };
        for e in batch {
            let (kind, verdict) = match e.kind {
                EventKind::Drop => ("drop", "denied"),
                EventKind::Audit => ("policy-verdict", "audit"),
                EventKind::PolicyVerdict if e.proxy_port != 0 => ("policy-verdict", "redirected"),
                EventKind::PolicyVerdict => ("policy-verdict", "allowed"),
            };
            let egress = e.direction == Direction::Egress;
            let (src_id, dst_id) = if egress {
                (None, Some(e.remote_identity))
            } else {
                (Some(e.remote_identity), None)
            };
            let mut extra = serde_json::Map::new();
            extra.insert("reason".into(), e.reason.as_str().into());
            extra.insert("srcPort".into(), e.src_port.into());
            extra.insert("bytes".into(), e.len.into());
            if e.proxy_port != 0 {
                extra.insert("proxyPort".into(), e.proxy_port.into());
            }
            if let Some(m) = e.matched {
                extra.insert(
                    "matchedEntry".into(),
                    serde_json::json!({
                        "identity": m.identity,
                        "protocol": m.protocol,
                        "port": m.port,
                        "prefixLen": m.prefix_len,
                    }),
                );
            }
            agent.events.publish(Event {
                time: super::fqdn::now().to_rfc3339(),
                kind,
                endpoint: names.get(&e.endpoint).cloned(),
                direction: Some(if egress { "egress" } else { "ingress" }),
                src_ip: Some(e.src.to_string()),
                dst_ip: Some(e.dst.to_string()),
                dport: Some(e.dst_port),
                protocol: Some(protocol_name(e.protocol)),
                src_identity: src_id,
                dst_identity: dst_id,
                verdict,
                extra,
            });
        }
    }
}

fn protocol_name(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        1 => "ICMP",
        58 => "ICMPv6",
        _ => "ANY",
    }
}
