//! The agent's configuration: one road from text to a checked [`Config`].
//!
//! YAML text → span-aware tree (`policy::yaml`) → strict decoding (unknown keys rejected) with
//! every problem collected as `FILE:LINE:COLUMN: path: message` → cross-field checks (unique
//! names and ids, no address shared by two endpoints) → typed config. Defaults are those of the
//! interface contract; the embedded default is what `fqdnwall run` uses when no config exists.

mod decode;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use policy::labels::{
    Label, LabelSet, CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL,
};
use policy::model::{Endpoint, Protocol};
use policy::{Diagnostic, Span};

use decode::{index, join, Decoder};

/// Where `fqdnwall run` looks for its configuration when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/fqdnwall/config.yaml";
pub const DEFAULT_POLICY_DIR: &str = "/etc/fqdnwall/policies";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fqdnwall";
pub const DEFAULT_DNS_LISTEN: &str = "127.0.0.1:5353";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9962";
/// The cluster name every endpoint carries (`io.cilium.k8s.policy.cluster`).
pub const CLUSTER_NAME: &str = "default";
/// Name of the host endpoint; no workload endpoint may use it.
pub const HOST_ENDPOINT_NAME: &str = "host";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from; `None` for the embedded default.
    pub file: Option<PathBuf>,
    pub policy_dir: PathBuf,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub datapath: DatapathMode,
    pub policy_audit_mode: bool,
    pub dns: DnsConfig,
    pub endpoints: Vec<EndpointConfig>,
    /// Namespace labels (`namespaces: {NAME: {labels: {..}}}`), exposed on the namespace's
    /// endpoints as `io.cilium.k8s.namespace.labels.<key>` for NetworkPolicy namespaceSelector.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub host: HostConfig,
    pub metrics: MetricsConfig,
    pub l7: L7Config,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathMode {
    Auto,
    Bpf,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    Refused,
    NameError,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    pub transparent: bool,
    pub reject_response_code: RejectCode,
    pub min_ttl: u32,
    pub max_ips_per_hostname: usize,
    pub response_max_delay: Duration,
    pub forward_timeout: Duration,
    /// `cpuWakeLatency`: the CPU wake-up latency bound held while the proxy is busy
    /// (`agent::wake`); `None` = off.
    pub cpu_wake_latency: Option<Duration>,
    /// `realtimePriority`: the SCHED_FIFO priority of the proxy's UDP receiving threads
    /// (`dnsproxy::ProxyConfig::realtime_priority`); `None` = off.
    pub realtime_priority: Option<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub id: u16,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub interface: Option<String>,
    pub named_ports: BTreeMap<String, (u16, Protocol)>,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    pub id: u16,
    pub labels: BTreeMap<String, String>,
    /// Addresses the host sends from (its queries to the proxy come from these).
    pub ips: Vec<IpAddr>,
    pub interfaces: Vec<String>,
    pub named_ports: BTreeMap<String, (u16, Protocol)>,
}

/// The L7 (HTTP, Kafka) proxies.
#[derive(Debug, Clone, PartialEq)]
pub struct L7Config {
    /// Listening ports; 0 picks a free port at start (shown by `status`).
    pub http_port: u16,
    pub kafka_port: u16,
    /// Body of the 403 answer to a denied HTTP request.
    pub denied_message: String,
    /// Where `headerMatches` secrets are read (`DIR/NAMESPACE/NAME` or `DIR/NAME`).
    pub secrets_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// `None` when metrics are switched off (`listen: null`).
    pub listen: Option<SocketAddr>,
}

/// A configuration that could not be loaded: every problem found, or an I/O error.
#[derive(Debug)]
pub enum ConfigError {
    Invalid(Vec<Diagnostic>),
    Io(PathBuf, std::io::Error),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Invalid(diags) => {
                for (i, d) in diags.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{d}")?;
                }
                Ok(())
            }
            ConfigError::Io(p, e) => write!(f, "cannot read config {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for ConfigError {}

const TOP_FIELDS: &[&str] = &[
    "policyDir",
    "stateDir",
    "apiSocket",
    "datapath",
    "policyAuditMode",
    "dns",
    "endpoints",
    "namespaces",
    "host",
    "metrics",
    "l7",
];
const DNS_FIELDS: &[&str] = &[
    "listen",
    "upstreams",
    "transparent",
    "rejectResponseCode",
    "minTTL",
    "maxIPsPerHostname",
    "responseMaxDelay",
    "forwardTimeout",
    "cpuWakeLatency",
    "realtimePriority",
];
const ENDPOINT_FIELDS: &[&str] = &[
    "id",
    "name",
    "namespace",
    "labels",
    "ips",
    "interface",
    "namedPorts",
    "serviceAccount",
];
const HOST_FIELDS: &[&str] = &["id", "labels", "ips", "interfaces", "namedPorts"];
const NAMESPACE_FIELDS: &[&str] = &["labels"];
const METRICS_FIELDS: &[&str] = &["listen"];
const L7_FIELDS: &[&str] = &["httpPort", "kafkaPort", "deniedMessage", "secretsDir"];

impl Config {
    /// The embedded default: DNS proxy on 127.0.0.1:5353 forwarding to the system resolver,
    /// no packet enforcement, the host as the only endpoint, policies from
    /// /etc/fqdnwall/policies.
    pub fn embedded_default() -> Config {
        Config {
            file: None,
            policy_dir: PathBuf::from(DEFAULT_POLICY_DIR),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            api_socket: PathBuf::from(crate::cli::DEFAULT_API_SOCKET),
            datapath: DatapathMode::None,
            policy_audit_mode: false,
            dns: DnsConfig::default_with_upstreams(system_upstreams()),
            endpoints: Vec::new(),
            namespaces: BTreeMap::new(),
            host: HostConfig {
                id: 1,
                labels: BTreeMap::new(),
                ips: default_host_ips(),
                interfaces: Vec::new(),
                named_ports: BTreeMap::new(),
            },
            metrics: MetricsConfig {
                listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            },
            l7: L7Config {
                http_port: 0,
                kafka_port: 0,
                denied_message: "Access denied".to_string(),
                secrets_dir: PathBuf::from("/etc/fqdnwall/secrets"),
            },
        }
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
        Config::parse(path, &text, system_upstreams)
    }

    /// Checks config text. `path` names the file in diagnostics and anchors a relative
    /// `policyDir`; `upstreams` gives the default of `dns.upstreams` (the system resolver).
    pub fn parse(
        path: &Path,
        text: &str,
        upstreams: impl FnOnce() -> Vec<SocketAddr>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut d = Decoder::new(&file);
        let docs = match policy::yaml::load_documents(text) {
            Ok(docs) => docs,
            Err((span, msg)) => {
                d.error(span, "", msg);
                return Err(ConfigError::Invalid(d.into_diagnostics()));
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Config::embedded_default();
        cfg.file = Some(path.to_path_buf());
        cfg.datapath = DatapathMode::Auto;
        cfg.host.ips = default_host_ips();
        cfg.l7.secrets_dir = base.join("secrets");
        let mut upstreams_given = false;
        match docs.as_slice() {
            [] => {}
            [doc] => decode_top(&mut d, doc, base, &mut cfg, &mut upstreams_given),
            [_, second, ..] => d.error(
                second.span,
                "",
                "a config file holds one YAML document, found several",
            ),
        }
        if !upstreams_given {
            cfg.dns.upstreams = upstreams();
        }
        if d.has_errors() {
            Err(ConfigError::Invalid(d.into_diagnostics()))
        } else {
            Ok(cfg)
        }
    }

    /// The engine's view of every endpoint: the host first, then the workloads in config order.
    pub fn policy_endpoints(&self) -> Vec<Endpoint> {
        let mut out = vec![self.host_endpoint()];
        out.extend(self.endpoints.iter().map(|e| self.workload_endpoint(e)));
        out
    }

    /// The host endpoint: `reserved:host` plus the host's labels.
    pub fn host_endpoint(&self) -> Endpoint {
        let mut labels = vec![Label::reserved("host")];
        labels.extend(self.host.labels.iter().map(|(k, v)| Label::k8s(k, v)));
        Endpoint {
            id: self.host.id,
            name: HOST_ENDPOINT_NAME.to_string(),
            labels: LabelSet::new(labels),
            ips: self.host.ips.clone(),
            named_ports: self.host.named_ports.clone(),
            is_host: true,
        }
    }

    /// A workload endpoint with the labels Cilium gives a pod: its own labels (source `k8s`),
    /// namespace, cluster, namespace labels and service account.
    pub fn workload_endpoint(&self, e: &EndpointConfig) -> Endpoint {
        Endpoint {
            id: e.id,
            name: e.name.clone(),
            labels: workload_labels(
                &e.namespace,
                &e.labels,
                self.namespaces.get(&e.namespace),
                Some(&e.service_account),
            ),
            ips: e.ips.clone(),
            named_ports: e.named_ports.clone(),
            is_host: false,
        }
    }
}

/// The labels of a workload in `namespace`, as Cilium derives them from a pod.
pub fn workload_labels(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    service_account: Option<&str>,
) -> LabelSet {
    let mut out: Vec<Label> = labels.iter().map(|(k, v)| Label::k8s(k, v)).collect();
    out.push(Label::k8s(NAMESPACE_LABEL, namespace));
    out.push(Label::k8s(CLUSTER_LABEL, CLUSTER_NAME));
    out.push(Label::k8s(
        &format!("{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name"),
        namespace,
    ));
    for (k, v) in namespace_labels.into_iter().flatten() {
        out.push(Label::k8s(&format!("{NAMESPACE_LABELS_PREFIX}{k}"), v));
    }
    if let Some(sa) = service_account {
        out.push(Label::k8s(SERVICE_ACCOUNT_LABEL, sa));
    }
    LabelSet::new(out)
}

impl DnsConfig {
    fn default_with_upstreams(upstreams: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig {
            listen: vec![DEFAULT_DNS_LISTEN.parse().expect("valid default")],
            upstreams,
            transparent: true,
            reject_response_code: RejectCode::Refused,
            min_ttl: 0,
            max_ips_per_hostname: 1000,
            response_max_delay: Duration::from_millis(100),
            forward_timeout: Duration::from_secs(10),
            cpu_wake_latency: None,
            realtime_priority: Some(1),
        }
    }
}

/// The host's own addresses as seen by the proxy: queries from local processes come from
/// loopback.
fn default_host_ips() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
}

/// The nameservers of /etc/resolv.conf on port 53; glibc's own fallback (127.0.0.1) when it
/// names none or cannot be read.
pub fn system_upstreams() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let found = parse_resolv_conf(&text);
    if found.is_empty() {
        vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53)]
    } else {
        found
    }
}

pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A link-local IPv6 server carries its zone (`fe80::1%eth0`); the zone is dropped
            // because SocketAddr cannot name interfaces by name.
            let addr = words.next()?.split('%').next()?;
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// `1.2.3.4:53`, `[::1]:53`, or an address alone (port 53).
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("invalid address {s:?}; write `1.2.3.4:53`, `[::1]:53` or `1.2.3.4`"))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("invalid listen address {s:?}; write `127.0.0.1:5353` or `[::1]:5353`")
    })
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("invalid IP address {s:?}"))
}

/// `80`, `80/TCP`, `53/udp`.
fn parse_named_port(s: &str) -> Result<(u16, Protocol), String> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (
            p,
            Protocol::parse(proto).ok_or_else(|| format!("unknown protocol {proto:?}"))?,
        ),
        None => (s, Protocol::Tcp),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid port {s:?}; write e.g. `8080` or `53/UDP`"))?;
    if matches!(proto, Protocol::Any | Protocol::Icmp | Protocol::Icmpv6) {
        return Err(format!("a named port needs TCP, UDP or SCTP, found {s:?}"));
    }
    Ok((port, proto))
}

/// Kubernetes label key: optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn check_label_key(k: &str) -> Result<(), String> {
    let name = match k.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty()
                || prefix.len() > 253
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            {
                return Err(format!("label key {k:?} has an invalid prefix"));
            }
            name
        }
        None => k,
    };
    check_label_name(name).map_err(|why| format!("label key {k:?} {why}"))
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    check_label_name(v).map_err(|why| format!("label value {v:?} {why}"))
}

fn check_label_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must have 1 to 63 characters");
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("may only contain letters, digits, '-', '_' and '.'");
    }
    let first = s.chars().next().unwrap_or('-');
    let last = s.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// DNS-label names (namespaces, service accounts): lower case, digits, '-', at most 63.
fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid name (lower-case letters, digits, '-', '.', at most 63)"
        ))
    }
}

fn decode_labels(
    d: &mut Decoder,
    node: &policy::yaml::Node,
    path: &str,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (knode, k, vnode) in d.map(node, path) {
        let p = join(path, k);
        if let Err(e) = check_label_key(k) {
            d.error(knode.span, &p, e);
            continue;
        }
        let Some(v) = d.scalar_string(vnode, &p) else {
            continue;
        };
        if let Err(e) = check_label_value(&v) {
            d.error(vnode.span, &p, e);
            continue;
        }
        out.insert(k.to_string(), v);
    }
    out
}

fn decode_named_ports(
    d: &mut Decoder,
    node: &policy::yaml::Node,
    path: &str,
) -> BTreeMap<String, (u16, Protocol)> {
    let mut out = BTreeMap::new();
    for (knode, k, vnode) in d.map(node, path) {
        let p = join(path, k);
        if let Err(e) = check_dns_label(k) {
            d.error(knode.span, &p, format!("named port {e}"));
            continue;
        }
        let v = match &vnode.value {
            policy::yaml::Value::Int(_) => d.uint(vnode, &p, 65535).and_then(|n| {
                if n == 0 {
                    d.error(vnode.span, &p, "port 0 cannot be named");
                    None
                } else {
                    Some((n as u16, Protocol::Tcp))
                }
            }),
            _ => d.parsed(vnode, &p, parse_named_port),
        };
        if let Some(v) = v {
            out.insert(k.to_string(), v);
        }
    }
    out
}

fn decode_ips(
    d: &mut Decoder,
    node: &policy::yaml::Node,
    path: &str,
) -> Vec<(Span, String, IpAddr)> {
    let mut out = Vec::new();
    for (span, p, s) in d.string_list(node, path) {
        match parse_ip(&s) {
            Ok(ip) => out.push((span, p, ip)),
            Err(e) => d.error(span, &p, e),
        }
    }
    out
}

/// Positions of decoded endpoint fields, kept for the cross-field checks.
struct EndpointSpans {
    item: Span,
    name: Span,
    id: Option<Span>,
    ips: Vec<(Span, String, IpAddr)>,
}

fn decode_top(
    d: &mut Decoder,
    doc: &policy::yaml::Node,
    base: &Path,
    cfg: &mut Config,
    upstreams_given: &mut bool,
) {
    if matches!(doc.value, policy::yaml::Value::Null) {
        return;
    }
    let Some(f) = d.fields(doc, "", TOP_FIELDS) else {
        return;
    };
    let dir = |d: &mut Decoder, name: &str, slot: &mut PathBuf, relative_to_file: bool| {
        if let Some(n) = f.get(name) {
            if let Some(s) = d.string(n, name) {
                if s.is_empty() {
                    d.error(n.span, name, "must not be empty");
                } else if relative_to_file {
                    *slot = base.join(&s);
                } else {
                    *slot = PathBuf::from(s);
                }
            }
        }
    };
    dir(d, "policyDir", &mut cfg.policy_dir, true);
    dir(d, "stateDir", &mut cfg.state_dir, true);
    dir(d, "apiSocket", &mut cfg.api_socket, true);
    if let Some(n) = f.get("datapath") {
        if let Some(s) = d.string(n, "datapath") {
            match s.as_str() {
                "auto" => cfg.datapath = DatapathMode::Auto,
                "bpf" => cfg.datapath = DatapathMode::Bpf,
                "none" => cfg.datapath = DatapathMode::None,
                other => d.error(
                    n.span,
                    "datapath",
                    format!("unknown datapath {other:?}; expected auto, bpf or none"),
                ),
            }
        }
    }
    if let Some(n) = f.get("policyAuditMode") {
        if let Some(b) = d.bool(n, "policyAuditMode") {
            cfg.policy_audit_mode = b;
        }
    }
    if let Some(n) = f.get("dns") {
        decode_dns(d, n, &mut cfg.dns, upstreams_given);
    }
    if let Some(n) = f.get("namespaces") {
        for (knode, ns, v) in d.map(n, "namespaces") {
            let p = join("namespaces", ns);
            if let Err(e) = check_dns_label(ns) {
                d.error(knode.span, &p, format!("namespace {e}"));
            }
            if let Some(nf) = d.fields(v, &p, NAMESPACE_FIELDS) {
                let labels = nf
                    .get("labels")
                    .map(|l| decode_labels(d, l, &join(&p, "labels")))
                    .unwrap_or_default();
                cfg.namespaces.insert(ns.to_string(), labels);
            }
        }
    }
    let mut taken_ids: Vec<(u16, Span, String)> = Vec::new();
    let mut host_id: Option<u16> = None;
    if let Some(n) = f.get("host") {
        if let Some(hf) = d.fields(n, "host", HOST_FIELDS) {
            if let Some(l) = hf.get("labels") {
                cfg.host.labels = decode_labels(d, l, "host.labels");
            }
            if let Some(l) = hf.get("ips") {
                cfg.host.ips = decode_ips(d, l, "host.ips")
                    .into_iter()
                    .map(|x| x.2)
                    .collect();
            }
            if let Some(l) = hf.get("interfaces") {
                cfg.host.interfaces = d
                    .string_list(l, "host.interfaces")
                    .into_iter()
                    .map(|x| x.2)
                    .collect();
            }
            if let Some(l) = hf.get("namedPorts") {
                cfg.host.named_ports = decode_named_ports(d, l, "host.namedPorts");
            }
            if let Some(idn) = hf.get("id") {
                if let Some(id) = decode_id(d, idn, "host.id") {
                    host_id = Some(id);
                    taken_ids.push((id, idn.span, "host.id".into()));
                }
            }
        }
    }
    let mut spans: Vec<EndpointSpans> = Vec::new();
    if let Some(n) = f.get("endpoints") {
        for (i, item) in d.seq(n, "endpoints").iter().enumerate() {
            let p = index("endpoints", i);
            let Some(ef) = d.fields(item, &p, ENDPOINT_FIELDS) else {
                continue;
            };
            let mut ep = EndpointConfig {
                id: 0,
                name: String::new(),
                namespace: "default".into(),
                labels: BTreeMap::new(),
                ips: Vec::new(),
                interface: None,
                named_ports: BTreeMap::new(),
                service_account: "default".into(),
            };
            let mut es = EndpointSpans {
                item: item.span,
                name: item.span,
                id: None,
                ips: Vec::new(),
            };
            match ef.get("name") {
                Some(nn) => {
                    es.name = nn.span;
                    if let Some(s) = d.string(nn, &join(&p, "name")) {
                        if let Err(e) = check_dns_label(&s) {
                            d.error(nn.span, &join(&p, "name"), format!("endpoint name {e}"));
                        }
                        ep.name = s;
                    }
                }
                None => d.error(item.span, &join(&p, "name"), "missing field `name`"),
            }
            if let Some(nn) = ef.get("namespace") {
                let pp = join(&p, "namespace");
                if let Some(s) = d.string(nn, &pp) {
                    if let Err(e) = check_dns_label(&s) {
                        d.error(nn.span, &pp, format!("namespace {e}"));
                    }
                    ep.namespace = s;
                }
            }
            if let Some(nn) = ef.get("serviceAccount") {
                let pp = join(&p, "serviceAccount");
                if let Some(s) = d.string(nn, &pp) {
                    if let Err(e) = check_dns_label(&s) {
                        d.error(nn.span, &pp, format!("service account {e}"));
                    }
                    ep.service_account = s;
                }
            }
            if let Some(nn) = ef.get("labels") {
                ep.labels = decode_labels(d, nn, &join(&p, "labels"));
            }
            if let Some(nn) = ef.get("ips") {
                es.ips = decode_ips(d, nn, &join(&p, "ips"));
                ep.ips = es.ips.iter().map(|x| x.2).collect();
            }
            if let Some(nn) = ef.get("interface") {
                ep.interface = d.string(nn, &join(&p, "interface"));
            }
            if let Some(nn) = ef.get("namedPorts") {
                ep.named_ports = decode_named_ports(d, nn, &join(&p, "namedPorts"));
            }
            if let Some(nn) = ef.get("id") {
                let pp = join(&p, "id");
                if let Some(id) = decode_id(d, nn, &pp) {
                    ep.id = id;
                    es.id = Some(nn.span);
                    taken_ids.push((id, nn.span, pp));
                }
            }
            cfg.endpoints.push(ep);
            spans.push(es);
        }
    }
    // Ids: explicit ones first (a repeat is an error), then the host and the endpoints
    // without one get the smallest free ids, the host first so that adding workloads never
    // renumbers it.
    let mut used: Vec<u16> = Vec::new();
    for (id, span, path) in &taken_ids {
        if used.contains(id) {
            d.error(*span, path, format!("endpoint id {id} is used twice"));
        }
        used.push(*id);
    }
    let next_free = |used: &mut Vec<u16>| {
        let id = (1..=u16::MAX).find(|c| !used.contains(c)).unwrap_or(0);
        used.push(id);
        id
    };
    cfg.host.id = host_id.unwrap_or_else(|| next_free(&mut used));
    for (ep, es) in cfg.endpoints.iter_mut().zip(&spans) {
        if es.id.is_none() {
            ep.id = next_free(&mut used);
        }
    }
    check_endpoints(d, cfg, &spans);
    if let Some(n) = f.get("metrics") {
        if let Some(mf) = d.fields(n, "metrics", METRICS_FIELDS) {
            if let Some(l) = mf.get("listen") {
                if matches!(l.value, policy::yaml::Value::Null) {
                    cfg.metrics.listen = None;
                } else {
                    cfg.metrics.listen = d.parsed(l, "metrics.listen", parse_listen);
                }
            }
        }
    }
    if let Some(n) = f.get("l7") {
        if let Some(lf) = d.fields(n, "l7", L7_FIELDS) {
            for (name, slot) in [
                ("httpPort", &mut cfg.l7.http_port),
                ("kafkaPort", &mut cfg.l7.kafka_port),
            ] {
                if let Some(v) = lf.get(name) {
                    if let Some(port) = d.uint(v, &join("l7", name), u64::from(u16::MAX)) {
                        *slot = port as u16;
                    }
                }
            }
            if let Some(v) = lf.get("deniedMessage") {
                if let Some(m) = d.string(v, "l7.deniedMessage") {
                    cfg.l7.denied_message = m;
                }
            }
            if let Some(v) = lf.get("secretsDir") {
                if let Some(s) = d.string(v, "l7.secretsDir") {
                    if s.is_empty() {
                        d.error(v.span, "l7.secretsDir", "must not be empty");
                    } else {
                        cfg.l7.secrets_dir = base.join(s);
                    }
                }
            }
            if cfg.l7.http_port != 0 && cfg.l7.http_port == cfg.l7.kafka_port {
                if let Some(v) = lf.get("kafkaPort") {
                    d.error(v.span, "l7.kafkaPort", "must differ from l7.httpPort");
                }
            }
        }
    }
}

fn decode_id(d: &mut Decoder, n: &policy::yaml::Node, path: &str) -> Option<u16> {
    let id = d.uint(n, path, u64::from(u16::MAX))? as u16;
    if id == 0 {
        d.error(n.span, path, "endpoint id 0 is reserved");
        return None;
    }
    Some(id)
}

fn check_endpoints(d: &mut Decoder, cfg: &Config, spans: &[EndpointSpans]) {
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for ip in &cfg.host.ips {
        owners.insert(*ip, "the host".into());
    }
    for (i, (ep, es)) in cfg.endpoints.iter().zip(spans).enumerate() {
        if ep.name == HOST_ENDPOINT_NAME {
            d.error(
                es.name,
                &join(&index("endpoints", i), "name"),
                "the name `host` is reserved for the host endpoint",
            );
        }
        if let Some(j) = cfg.endpoints[..i]
            .iter()
            .position(|o| !o.name.is_empty() && o.name == ep.name)
        {
            d.error(
                es.name,
                &join(&index("endpoints", i), "name"),
                format!(
                    "endpoint name {:?} is already used by endpoints[{j}]",
                    ep.name
                ),
            );
        }
        if cfg.datapath == DatapathMode::Bpf && ep.interface.is_none() {
            d.error(
                es.item,
                &join(&index("endpoints", i), "interface"),
                format!(
                    "endpoint {:?} needs `interface` with `datapath: bpf` (the host side of its veth)",
                    ep.name
                ),
            );
        }
        if ep.ips.is_empty() {
            d.error(
                es.item,
                &join(&index("endpoints", i), "ips"),
                "an endpoint needs at least one address (its queries are recognised by source address)",
            );
        }
        for (span, path, ip) in &es.ips {
            match owners.get(ip) {
                Some(owner) => d.error(
                    *span,
                    path,
                    format!("address {ip} is already used by {owner}"),
                ),
                None => {
                    owners.insert(*ip, format!("endpoint {:?}", ep.name));
                }
            }
        }
    }
}

fn decode_dns(
    d: &mut Decoder,
    n: &policy::yaml::Node,
    dns: &mut DnsConfig,
    upstreams_given: &mut bool,
) {
    let Some(f) = d.fields(n, "dns", DNS_FIELDS) else {
        return;
    };
    if let Some(l) = f.get("listen") {
        let mut out = Vec::new();
        let given = d.string_list(l, "dns.listen");
        let none_given = given.is_empty()
            && matches!(
                l.value,
                policy::yaml::Value::Seq(_) | policy::yaml::Value::Null
            );
        for (span, p, s) in given {
            match parse_listen(&s) {
                Ok(a) => out.push(a),
                Err(e) => d.error(span, &p, e),
            }
        }
        if none_given {
            d.error(
                l.span,
                "dns.listen",
                "at least one listen address is needed",
            );
        }
        dns.listen = out;
    }
    if let Some(l) = f.get("upstreams") {
        *upstreams_given = true;
        let mut out = Vec::new();
        let given = d.string_list(l, "dns.upstreams");
        let none_given = given.is_empty()
            && matches!(
                l.value,
                policy::yaml::Value::Seq(_) | policy::yaml::Value::Null
            );
        for (span, p, s) in given {
            match parse_upstream(&s) {
                Ok(a) => out.push(a),
                Err(e) => d.error(span, &p, e),
            }
        }
        if none_given {
            d.error(l.span, "dns.upstreams", "at least one upstream is needed");
        }
        dns.upstreams = out;
    }
    if let Some(v) = f
        .get("transparent")
        .and_then(|x| d.bool(x, "dns.transparent"))
    {
        dns.transparent = v;
    }
    if let Some(x) = f.get("rejectResponseCode") {
        if let Some(s) = d.string(x, "dns.rejectResponseCode") {
            match s.as_str() {
                "refused" => dns.reject_response_code = RejectCode::Refused,
                "nameError" => dns.reject_response_code = RejectCode::NameError,
                other => d.error(
                    x.span,
                    "dns.rejectResponseCode",
                    format!("unknown response code {other:?}; expected refused or nameError"),
                ),
            }
        }
    }
    if let Some(v) = f
        .get("minTTL")
        .and_then(|x| d.uint(x, "dns.minTTL", u64::from(u32::MAX)))
    {
        dns.min_ttl = v as u32;
    }
    if let Some(x) = f.get("maxIPsPerHostname") {
        if let Some(v) = d.uint(x, "dns.maxIPsPerHostname", 1 << 20) {
            if v == 0 {
                d.error(x.span, "dns.maxIPsPerHostname", "must be at least 1");
            } else {
                dns.max_ips_per_hostname = v as usize;
            }
        }
    }
    if let Some(v) = f
        .get("responseMaxDelay")
        .and_then(|x| d.duration(x, "dns.responseMaxDelay"))
    {
        dns.response_max_delay = v;
    }
    if let Some(x) = f.get("forwardTimeout") {
        if let Some(v) = d.duration(x, "dns.forwardTimeout") {
            if v.is_zero() {
                d.error(x.span, "dns.forwardTimeout", "must be longer than 0");
            } else {
                dns.forward_timeout = v;
            }
        }
    }
    if let Some(x) = f.get("cpuWakeLatency") {
        if matches!(&x.value, policy::yaml::Value::Str(s) if s == "off") {
            dns.cpu_wake_latency = None;
        } else if let Some(v) = d.duration(x, "dns.cpuWakeLatency") {
            if v > Duration::from_secs(1) {
                d.error(
                    x.span,
                    "dns.cpuWakeLatency",
                    "a wake-up latency bound longer than 1s bounds nothing; use `off` or e.g. `0us`",
                );
            } else {
                dns.cpu_wake_latency = Some(v);
            }
        }
    }
    if let Some(x) = f.get("realtimePriority") {
        if matches!(&x.value, policy::yaml::Value::Str(s) if s == "off") {
            dns.realtime_priority = None;
        } else if let Some(v) = d.uint(x, "dns.realtimePriority", 99) {
            if v == 0 {
                d.error(
                    x.span,
                    "dns.realtimePriority",
                    "realtime priorities are 1 to 99; use `off` for normal priority",
                );
            } else {
                dns.realtime_priority = Some(v as u8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/fw/config.yaml"), text, || {
            vec!["192.0.2.53:53".parse().unwrap()]
        })
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid(d)) => d.iter().map(|d| d.to_string()).collect(),
            other => panic!("expected errors, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse("{}\n").unwrap();
        assert_eq!(c.policy_dir, PathBuf::from(DEFAULT_POLICY_DIR));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.api_socket, PathBuf::from("/run/fqdnwall/api.sock"));
        assert_eq!(c.datapath, DatapathMode::Auto);
        assert!(!c.policy_audit_mode);
        assert_eq!(c.dns.listen, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(c.dns.upstreams, vec!["192.0.2.53:53".parse().unwrap()]);
        assert!(c.dns.transparent);
        assert_eq!(c.dns.reject_response_code, RejectCode::Refused);
        assert_eq!(c.dns.min_ttl, 0);
        assert_eq!(c.dns.max_ips_per_hostname, 1000);
        assert_eq!(c.dns.response_max_delay, Duration::from_millis(100));
        assert_eq!(c.dns.forward_timeout, Duration::from_secs(10));
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9962".parse().unwrap()));
        assert_eq!(c.host.id, 1);
    }

    #[test]
    fn full_example_and_labels() {
        let c = parse(
            "policyDir: policies/\n\
             datapath: none\n\
             dns:\n  listen: [\"127.0.0.1:5300\"]\n  upstreams: [\"127.0.0.1\", \"[::1]:5301\"]\n  \
             rejectResponseCode: nameError\n  responseMaxDelay: 250ms\n  forwardTimeout: 2s\n\
             namespaces:\n  prod: {labels: {team: a}}\n\
             endpoints:\n  - name: frontend\n    namespace: prod\n    labels: {app: frontend}\n    \
             ips: [\"10.200.1.2\", \"fd00:200::1:2\"]\n    namedPorts: {http: 8080, dns: 53/UDP}\n\
             host:\n  labels: {node-role.kubernetes.io/worker: \"\"}\n",
        )
        .unwrap();
        assert_eq!(c.policy_dir, PathBuf::from("/etc/fw/policies/"));
        assert_eq!(
            c.dns.upstreams,
            vec![
                "127.0.0.1:53".parse().unwrap(),
                "[::1]:5301".parse().unwrap()
            ]
        );
        assert_eq!(c.dns.reject_response_code, RejectCode::NameError);
        let eps = c.policy_endpoints();
        assert_eq!(eps[0].name, "host");
        assert!(eps[0].is_host);
        assert_eq!(eps[1].id, 2);
        let labels: Vec<String> = eps[1]
            .labels
            .labels()
            .iter()
            .map(|l| l.to_string())
            .collect();
        for want in [
            "k8s:app=frontend",
            "k8s:io.kubernetes.pod.namespace=prod",
            "k8s:io.cilium.k8s.policy.cluster=default",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
            "k8s:io.cilium.k8s.namespace.labels.team=a",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
        ] {
            assert!(
                labels.contains(&want.to_string()),
                "{want} missing from {labels:?}"
            );
        }
        assert_eq!(eps[1].named_ports["dns"], (53, Protocol::Udp));
        let host: Vec<String> = eps[0]
            .labels
            .labels()
            .iter()
            .map(|l| l.to_string())
            .collect();
        assert!(host.contains(&"reserved:host".to_string()));
        assert!(host.contains(&"k8s:node-role.kubernetes.io/worker".to_string()));
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let e = errors(
            "policyDirr: x\n\
             dns:\n  minTTL: -1\n  responseMaxDelay: fast\n\
             endpoints:\n  - name: a\n    ips: [\"10.0.0.1\"]\n  - name: a\n    ips: [\"10.0.0.1\", \"nope\"]\n",
        );
        assert_eq!(
            e,
            vec![
                "/etc/fw/config.yaml:1:1: policyDirr: unknown field `policyDirr` (did you mean `policyDir`?)",
                "/etc/fw/config.yaml:3:11: dns.minTTL: -1 is out of range 0..=4294967295",
                "/etc/fw/config.yaml:4:21: dns.responseMaxDelay: invalid duration \"fast\"; write e.g. `100ms` or `10s`",
                "/etc/fw/config.yaml:8:11: endpoints[1].name: endpoint name \"a\" is already used by endpoints[0]",
                "/etc/fw/config.yaml:9:11: endpoints[1].ips[0]: address 10.0.0.1 is already used by endpoint \"a\"",
                "/etc/fw/config.yaml:9:23: endpoints[1].ips[1]: invalid IP address \"nope\"",
            ]
        );
    }

    #[test]
    fn realtime_priority_is_off_1_to_99_or_an_error() {
        assert_eq!(
            parse("datapath: none\n").unwrap().dns.realtime_priority,
            Some(1)
        );
        let c = parse("dns:\n  realtimePriority: 50\n").unwrap();
        assert_eq!(c.dns.realtime_priority, Some(50));
        let c = parse("dns:\n  realtimePriority: off\n").unwrap();
        assert_eq!(c.dns.realtime_priority, None);
        assert_eq!(
            errors("dns:\n  realtimePriority: 0\n"),
            vec!["/etc/fw/config.yaml:2:21: dns.realtimePriority: realtime priorities are 1 to 99; use `off` for normal priority"]
        );
        assert_eq!(errors("dns:\n  realtimePriority: 100\n").len(), 1);
        assert_eq!(errors("dns:\n  realtimePriority: high\n").len(), 1);
    }

    #[test]
    fn cpu_wake_latency_is_off_a_duration_or_an_error() {
        assert_eq!(
            parse("datapath: none\n").unwrap().dns.cpu_wake_latency,
            None
        );
        let c = parse("dns:\n  cpuWakeLatency: 0us\n").unwrap();
        assert_eq!(c.dns.cpu_wake_latency, Some(Duration::ZERO));
        let c = parse("dns:\n  cpuWakeLatency: 20us\n").unwrap();
        assert_eq!(c.dns.cpu_wake_latency, Some(Duration::from_micros(20)));
        let c = parse("dns:\n  cpuWakeLatency: \"off\"\n").unwrap();
        assert_eq!(c.dns.cpu_wake_latency, None);
        let c = parse("dns:\n  cpuWakeLatency: off\n").unwrap();
        assert_eq!(c.dns.cpu_wake_latency, None);
        assert_eq!(
            errors("dns:\n  cpuWakeLatency: 2s\n"),
            vec!["/etc/fw/config.yaml:2:19: dns.cpuWakeLatency: a wake-up latency bound longer than 1s bounds nothing; use `off` or e.g. `0us`"]
        );
        assert_eq!(errors("dns:\n  cpuWakeLatency: true\n").len(), 1);
    }

    #[test]
    fn unknown_keys_and_wrong_types() {
        let e = errors(
            "dns:\n  servers: [\"1.1.1.1\"]\n  transparent: 1\nendpoints:\n  - name: web\n    namespace: 7\n    ips: [\"10.0.0.9\"]\nhost: []\n",
        );
        assert_eq!(
            e,
            vec![
                "/etc/fw/config.yaml:2:3: dns.servers: unknown field `servers`; expected one of: listen, upstreams, transparent, rejectResponseCode, minTTL, maxIPsPerHostname, responseMaxDelay, forwardTimeout, cpuWakeLatency, realtimePriority",
                "/etc/fw/config.yaml:3:16: dns.transparent: expected true or false, found an integer",
                "/etc/fw/config.yaml:6:16: endpoints[0].namespace: expected a string, found an integer (write it in quotes: \"7\")",
                "/etc/fw/config.yaml:8:7: host: expected a map, found a list",
            ]
        );
    }

    #[test]
    fn resolv_conf() {
        assert_eq!(
            parse_resolv_conf("# x\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch a\n"),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
