//! What commands show: the JSON shapes of the interface contract (field names fixed, more may
//! be added) and their text renderings. The agent's API answers with these same shapes, so a
//! live command only renders what it receives.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One rule that decided a verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleView {
    /// `namespace/name`, or `name` for clusterwide policies.
    pub policy: String,
    pub kind: String,
    pub file: String,
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirTraceView {
    pub verdict: String,
    pub rules: Vec<RuleView>,
    pub enforced: bool,
    pub endpoint: Option<String>,
    pub reason: String,
    pub proxy_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracePeerView {
    /// The selector as given (`endpoint:frontend`, `ip:1.2.3.4`, ...).
    pub selector: String,
    pub identity: u32,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TraceView {
    pub verdict: String,
    pub egress: DirTraceView,
    pub ingress: DirTraceView,
    pub src: TracePeerView,
    pub dst: TracePeerView,
    pub dport: u16,
    pub protocol: String,
    /// `offline` (from files) or `live` (the running agent, FQDN-learned IPs included).
    pub mode: String,
}

/// The request a live `policy trace` sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceRequest {
    pub src: String,
    pub dst: String,
    pub dport: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Enforcement {
    pub ingress: bool,
    pub egress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub id: u16,
    pub name: String,
    pub identity: u32,
    /// `source:key` → value.
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub policy_enforcement: Enforcement,
    pub audit_mode: bool,
    pub is_host: bool,
    pub interface: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdentityView {
    pub id: u32,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MapEntryView {
    pub policy: String,
    pub direction: String,
    pub identity: u32,
    pub port: u16,
    pub end_port: u16,
    pub protocol: String,
    pub proxy_port: u16,
    pub packets: u64,
    pub bytes: u64,
    /// The policies that put the entry there.
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpcacheView {
    pub prefix: String,
    pub identity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FqdnEntryView {
    pub endpoint: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub ttl: u64,
    pub expires_at: String,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FqdnCleanView {
    pub removed: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRuleCount {
    pub policy: String,
    pub kind: String,
    pub file: String,
    pub line: u32,
    pub rules: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicySourceView {
    pub file: String,
    /// Whether the file's current content is in force.
    pub valid: bool,
    pub policies: usize,
    /// Why the file's current content was refused (the previous content stays in force).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyGetView {
    pub revision: u64,
    pub policy_dir: String,
    pub policies: Vec<PolicyRuleCount>,
    pub sources: Vec<PolicySourceView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPortsView {
    pub dns: u16,
    pub http: u16,
    pub kafka: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub version: String,
    pub health: String,
    pub datapath: String,
    pub config: String,
    pub dns_listen: Vec<String>,
    pub dns_upstreams: Vec<String>,
    pub metrics_listen: Option<String>,
    pub proxy_ports: ProxyPortsView,
    pub policy_audit_mode: bool,
    pub policy_revision: u64,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_errors: Vec<String>,
    pub ipcache_entries: usize,
    pub policy_map_entries: usize,
    pub fqdn_names: usize,
    pub fqdn_ips: usize,
    pub uptime_seconds: u64,
    /// The eBPF datapath: attached programs, map pressure, kernel counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf: Option<BpfStatusView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BpfStatusView {
    pub pin_dir: String,
    /// The pinned maps and programs of a previous run were adopted at start.
    pub adopted: bool,
    /// Loaded programs and their kernel ids.
    pub programs: Vec<(String, u32)>,
    pub attachments: Vec<BpfAttachmentView>,
    pub maps: Vec<BpfMapView>,
    pub counters: Vec<(String, u64)>,
    /// Map updates refused because a map was full (their traffic is dropped, never allowed).
    pub map_full_errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BpfAttachmentView {
    pub interface: String,
    pub ifindex: u32,
    /// `endpoint` (an endpoint's host-side veth) or `host` (host firewall).
    pub kind: String,
    pub endpoint: u16,
    pub identity: u32,
    pub audit: bool,
    /// Kernel ids of the programs on the tc ingress and egress hooks.
    pub program_ids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BpfMapView {
    pub name: String,
    pub entries: u64,
    pub capacity: u32,
    /// entries / capacity
    pub pressure: f64,
}

/// Result of `policy validate` for one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValidateView {
    pub file: String,
    pub valid: bool,
    pub policies: usize,
    pub rules: usize,
    pub errors: Vec<ErrorView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorView {
    pub line: u32,
    pub column: u32,
    pub path: String,
    pub message: String,
}

/// Text renderings.
pub mod text {
    use super::*;

    pub fn trace(t: &TraceView) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Flow: {} (identity {}) -> {} (identity {}), port {}/{} [{}]",
            t.src.selector,
            t.src.identity,
            t.dst.selector,
            t.dst.identity,
            t.dport,
            t.protocol,
            t.mode
        );
        for (name, d) in [("Egress", &t.egress), ("Ingress", &t.ingress)] {
            let who = d
                .endpoint
                .as_deref()
                .map(|e| format!(" of endpoint {e}"))
                .unwrap_or_default();
            let _ = writeln!(s, "{name}{who}: {} ({})", d.verdict, d.reason);
            if d.proxy_port != 0 {
                let _ = writeln!(s, "  redirected to proxy port {}", d.proxy_port);
            }
            for r in &d.rules {
                let _ = writeln!(
                    s,
                    "  rule {} ({}) at {}:{}:{}",
                    r.policy, r.kind, r.file, r.line, r.column
                );
            }
        }
        let _ = writeln!(s, "Verdict: {}", t.verdict);
        s
    }

    fn yes(b: bool) -> &'static str {
        if b {
            "enabled"
        } else {
            "disabled"
        }
    }

    pub fn endpoints(eps: &[EndpointView]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<6} {:<20} {:<10} {:<9} {:<9} {:<6} {:<32} LABELS",
            "ID", "NAME", "IDENTITY", "INGRESS", "EGRESS", "AUDIT", "IPS"
        );
        for e in eps {
            let ips: Vec<String> = e.ips.iter().map(|i| i.to_string()).collect();
            let labels: Vec<String> = e.labels.iter().map(|(k, v)| label(k, v)).collect();
            let _ = writeln!(
                s,
                "{:<6} {:<20} {:<10} {:<9} {:<9} {:<6} {:<32} {}",
                e.id,
                e.name,
                e.identity,
                yes(e.policy_enforcement.ingress),
                yes(e.policy_enforcement.egress),
                if e.audit_mode { "on" } else { "off" },
                ips.join(","),
                labels.join(" ")
            );
        }
        s
    }

    fn label(k: &str, v: &str) -> String {
        if v.is_empty() {
            k.to_string()
        } else {
            format!("{k}={v}")
        }
    }

    pub fn endpoint(e: &EndpointView) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "ID:        {}", e.id);
        let _ = writeln!(s, "Name:      {}", e.name);
        let _ = writeln!(s, "Identity:  {}", e.identity);
        let ips: Vec<String> = e.ips.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(s, "IPs:       {}", ips.join(", "));
        if let Some(i) = &e.interface {
            let _ = writeln!(s, "Interface: {i}");
        }
        let _ = writeln!(
            s,
            "Policy:    ingress {}, egress {}",
            yes(e.policy_enforcement.ingress),
            yes(e.policy_enforcement.egress)
        );
        let _ = writeln!(s, "Audit:     {}", if e.audit_mode { "on" } else { "off" });
        let _ = writeln!(s, "Labels:");
        for (k, v) in &e.labels {
            let _ = writeln!(s, "  {}", label(k, v));
        }
        s
    }

    pub fn identities(ids: &[IdentityView]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{:<10} LABELS", "ID");
        for i in ids {
            let mut first = true;
            for l in &i.labels {
                if first {
                    let _ = writeln!(s, "{:<10} {l}", i.id);
                    first = false;
                } else {
                    let _ = writeln!(s, "{:<10} {l}", "");
                }
            }
            if first {
                let _ = writeln!(s, "{:<10}", i.id);
            }
        }
        s
    }

    pub fn map_entries(rows: &[MapEntryView]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<7} {:<9} {:<10} {:<13} {:<7} {:<6} {:<10} {:<10} RULES",
            "POLICY", "DIRECTION", "IDENTITY", "PORT", "PROTO", "PROXY", "PACKETS", "BYTES"
        );
        for r in rows {
            let port = match (r.port, r.end_port) {
                (0, _) => "ANY".to_string(),
                (p, e) if e == p || e == 0 => p.to_string(),
                (p, e) => format!("{p}-{e}"),
            };
            let identity = if r.identity == 0 {
                "ANY".to_string()
            } else {
                r.identity.to_string()
            };
            let _ = writeln!(
                s,
                "{:<7} {:<9} {:<10} {:<13} {:<7} {:<6} {:<10} {:<10} {}",
                r.policy,
                r.direction,
                identity,
                port,
                r.protocol,
                r.proxy_port,
                r.packets,
                r.bytes,
                r.rules.join(",")
            );
        }
        s
    }

    pub fn ipcache(rows: &[IpcacheView]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{:<44} IDENTITY", "PREFIX");
        for r in rows {
            let _ = writeln!(s, "{:<44} {}", r.prefix, r.identity);
        }
        s
    }

    pub fn fqdn(rows: &[FqdnEntryView]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:<40} {:<8} {:<26} {:<7} IPS",
            "ENDPOINT", "NAME", "TTL", "EXPIRES", "SOURCE"
        );
        for r in rows {
            let ips: Vec<String> = r.ips.iter().map(|i| i.to_string()).collect();
            let _ = writeln!(
                s,
                "{:<16} {:<40} {:<8} {:<26} {:<7} {}",
                r.endpoint,
                r.name,
                r.ttl,
                r.expires_at,
                r.source,
                ips.join(",")
            );
        }
        s
    }

    pub fn policy_get(p: &PolicyGetView) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Revision: {}", p.revision);
        let _ = writeln!(s, "Directory: {}", p.policy_dir);
        if p.policies.is_empty() {
            let _ = writeln!(
                s,
                "No policy in force: every flow and every query is allowed."
            );
        }
        for pol in &p.policies {
            let _ = writeln!(
                s,
                "{} {} ({} {}) from {}:{}",
                pol.kind,
                pol.policy,
                pol.rules,
                if pol.rules == 1 { "rule" } else { "rules" },
                pol.file,
                pol.line
            );
        }
        for src in p.sources.iter().filter(|s| !s.valid) {
            let _ = writeln!(
                s,
                "Refused change to {} (previous content stays in force):",
                src.file
            );
            for e in &src.errors {
                let _ = writeln!(s, "  {e}");
            }
        }
        s
    }

    pub fn status(st: &StatusView) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Health:        {}", st.health);
        let _ = writeln!(s, "Version:       {}", st.version);
        let _ = writeln!(s, "Config:        {}", st.config);
        let _ = writeln!(s, "Datapath:      {}", st.datapath);
        let _ = writeln!(s, "DNS listen:    {}", st.dns_listen.join(", "));
        let _ = writeln!(s, "DNS upstreams: {}", st.dns_upstreams.join(", "));
        let _ = writeln!(
            s,
            "Proxy ports:   dns {}, http {}, kafka {}",
            st.proxy_ports.dns, st.proxy_ports.http, st.proxy_ports.kafka
        );
        if let Some(m) = &st.metrics_listen {
            let _ = writeln!(s, "Metrics:       http://{m}/metrics");
        }
        let _ = writeln!(s, "Audit mode:    {}", st.policy_audit_mode);
        let _ = writeln!(
            s,
            "Policy:        revision {}, {} policies",
            st.policy_revision, st.policies
        );
        let _ = writeln!(s, "Endpoints:     {}", st.endpoints);
        let _ = writeln!(s, "Identities:    {}", st.identities);
        let _ = writeln!(
            s,
            "Maps:          {} policy entries, {} ipcache entries",
            st.policy_map_entries, st.ipcache_entries
        );
        let _ = writeln!(
            s,
            "FQDN cache:    {} names, {} IPs",
            st.fqdn_names, st.fqdn_ips
        );
        let _ = writeln!(s, "Uptime:        {}s", st.uptime_seconds);
        if let Some(b) = &st.bpf {
            let _ = writeln!(
                s,
                "eBPF:          pins in {}{}",
                b.pin_dir,
                if b.adopted {
                    " (adopted from a previous run)"
                } else {
                    ""
                }
            );
            for a in &b.attachments {
                let _ = writeln!(
                    s,
                    "  attached:    {} (ifindex {}, {} {}, identity {}, programs {:?}{})",
                    a.interface,
                    a.ifindex,
                    a.kind,
                    a.endpoint,
                    a.identity,
                    a.program_ids,
                    if a.audit { ", audit" } else { "" }
                );
            }
            for m in &b.maps {
                let _ = writeln!(
                    s,
                    "  map:         {} {}/{} ({:.1}%)",
                    m.name,
                    m.entries,
                    m.capacity,
                    m.pressure * 100.0
                );
            }
            if b.map_full_errors > 0 {
                let _ = writeln!(s, "  map full:    {} refused updates", b.map_full_errors);
            }
        }
        for e in &st.policy_errors {
            let _ = writeln!(s, "Policy error:  {e}");
        }
        s
    }
}
