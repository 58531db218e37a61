//! The local API: HTTP/1.1 with JSON bodies over the agent's Unix socket.
//!
//! [`client`] is what the live commands use; the agent side is [`crate::agent::server`].
//! Routes (all under `/v1`) are listed in [`paths`] so both sides agree on them.

pub mod client;

pub mod paths {
    pub const STATUS: &str = "/v1/status";
    pub const POLICY: &str = "/v1/policy";
    pub const POLICY_TRACE: &str = "/v1/policy/trace";
    pub const ENDPOINTS: &str = "/v1/endpoints";
    pub const CONFIG: &str = "/v1/config";
    pub const IDENTITIES: &str = "/v1/identities";
    pub const BPF_POLICY: &str = "/v1/bpf/policy";
    pub const BPF_IPCACHE: &str = "/v1/bpf/ipcache";
    pub const FQDN_CACHE: &str = "/v1/fqdn/cache";
    pub const MONITOR: &str = "/v1/monitor";
}

/// Percent-encodes a path segment or query value (endpoint names, DNS names, `*`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
