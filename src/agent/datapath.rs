//! The datapath: where the engine's decisions become enforcement.
//!
//! The agent hands every engine [`Changes`] to a [`Datapath`], in the order the engine produced
//! them. Within one `Changes` the policy map diffs are applied before the ipcache entries:
//! an IP must never map to an identity whose allow entries are not in place yet, or its first
//! packets would be dropped (and a DNS response released on that promise would lie). The
//! returned future resolves when the datapath holds the entries; the DNS proxy holds responses
//! on it.
//!
//! [`MemoryDatapath`] keeps the maps in memory: it is the datapath of `datapath: none` (no
//! packet enforcement; `bpf policy get` and `bpf ipcache list` show what would be enforced)
//! and of tests. The eBPF datapath implements the same trait.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;

use ipnet::IpNet;
use policy::engine::Changes;
use policy::mapstate::{MapEntry, MapKey};

/// A future that resolves when a change is enforceable; the error says why it is not (e.g. a
/// full map: the entry is missing, so its traffic is dropped, never silently allowed).
pub type Applied = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One policy map row with its counters.
#[derive(Debug, Clone)]
pub struct MapRow {
    pub key: MapKey,
    pub entry: MapEntry,
    pub packets: u64,
    pub bytes: u64,
}

pub trait Datapath: Send + Sync + 'static {
    /// `none` or `bpf`, for `status`.
    fn name(&self) -> &'static str;
    /// Starts applying `changes` (policy map diffs first, then ipcache upserts and deletes);
    /// called in the order the engine produced them. The future resolves once they are held.
    fn apply(&self, changes: &Changes) -> Applied;
    /// The endpoint's policy map as the datapath holds it; `None` for an unknown endpoint.
    fn policy_map(&self, endpoint: u16) -> Option<Vec<MapRow>>;
    /// The ipcache as the datapath holds it.
    fn ipcache(&self) -> Vec<(IpNet, u32)>;
    /// Open connections as (endpoint, remote IP): an expired FQDN IP with one stays allowed
    /// (a zombie) until it closes. Empty where the datapath tracks none.
    fn connections(&self) -> Vec<(u16, IpAddr)>;
    /// Total policy map entries over all endpoints.
    fn policy_entries(&self) -> usize;
    /// Audit mode of one endpoint (global or its own): would-be drops pass and are reported.
    fn set_audit(&self, endpoint: u16, on: bool);
    /// Attached programs, map pressure and kernel counters; `None` without a kernel datapath.
    fn kernel_status(&self) -> Option<crate::view::BpfStatusView> {
        None
    }
}

/// The in-memory datapath.
#[derive(Default)]
pub struct MemoryDatapath {
    inner: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    policy: BTreeMap<u16, BTreeMap<MapKey, MapEntry>>,
    ipcache: BTreeMap<IpNet, u32>,
    audit: BTreeMap<u16, bool>,
}

impl MemoryDatapath {
    pub fn new() -> MemoryDatapath {
        MemoryDatapath::default()
    }
}

impl Datapath for MemoryDatapath {
    fn name(&self) -> &'static str {
        "none"
    }

    fn apply(&self, changes: &Changes) -> Applied {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Policy maps first, then the ipcache (the ordering invariant above); within one
        // lock the order is invisible to readers, but it is the order the kernel datapath
        // must follow, so this implementation keeps to it as well.
        for (ep, diff) in &changes.maps {
            let map = m.policy.entry(*ep).or_default();
            for k in &diff.deletes {
                map.remove(k);
            }
            for (k, e) in &diff.adds {
                map.insert(*k, e.clone());
            }
        }
        for (prefix, id) in &changes.ipcache_upserts {
            m.ipcache.insert(*prefix, *id);
        }
        for prefix in &changes.ipcache_deletes {
            m.ipcache.remove(prefix);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn policy_map(&self, endpoint: u16) -> Option<Vec<MapRow>> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let map = m.policy.get(&endpoint)?;
        Some(
            map.iter()
                .map(|(k, e)| MapRow {
                    key: *k,
                    entry: e.clone(),
                    // No packets pass through user space: the counters stay at zero.
                    packets: 0,
                    bytes: 0,
                })
                .collect(),
        )
    }

    fn ipcache(&self) -> Vec<(IpNet, u32)> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.ipcache.iter().map(|(p, i)| (*p, *i)).collect()
    }

    fn connections(&self) -> Vec<(u16, IpAddr)> {
        // No packets pass through user space, so no connection is known to be open.
        Vec::new()
    }

    fn policy_entries(&self) -> usize {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.policy.values().map(|x| x.len()).sum()
    }

    fn set_audit(&self, endpoint: u16, on: bool) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.audit.insert(endpoint, on);
    }
}
