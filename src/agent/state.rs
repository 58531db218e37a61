//! The agent's policy state: the configuration, the policy engine fed with the config's
//! endpoints and the policy directory's files, which file contributes what, and the audit
//! switches. Offline commands (`policy trace --config`) build it once; the running agent keeps
//! one behind a lock and hands the engine's changes to the datapath.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dnsproxy::{Decision, Transport};
use fqdn_cache::{FqdnCache, FqdnIdentity, PatternIndex};
use ipnet::IpNet;
use policy::fqdn::DnsName;
use policy::labels::LabelSet;

use policy::engine::{Changes, DnsVerdict, Engine};
use policy::identity::IdentityAllocator;
use policy::mapstate::ProxyPorts;
use policy::model::{Direction, DnsRule, FqdnSelector, Protocol};
use policy::trace::{AuditModes, DirTrace, Trace, Verdict};

use super::datapath::MapRow;
use crate::config::Config;
use crate::peer::PeerSel;
use crate::policies::{self, Loaded};
use crate::view::{
    DirTraceView, EndpointView, Enforcement, IdentityView, MapEntryView, PolicyGetView,
    PolicyRuleCount, PolicySourceView, RuleView, TracePeerView, TraceView,
};

/// A learned IP's place in the ipcache.
#[derive(Debug, Clone, Copy)]
pub struct FqdnIp {
    pub cache: FqdnIdentity,
    pub identity: u32,
    /// Whether `identity` was allocated for this IP's `cidr:` labels (one reference each).
    pub derived: bool,
}

/// What one policy file contributes.
#[derive(Debug, Clone, Default)]
pub struct SourceState {
    /// Policies of the file's content in force.
    pub policies: usize,
    /// Whether the file's current content is what is in force.
    pub valid: bool,
    /// Why the current content was refused (the previous content stays in force).
    pub errors: Vec<String>,
    /// Modification time and length of the content last read, to notice changes.
    pub stamp: Option<FileStamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub modified: Option<std::time::SystemTime>,
    pub len: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<FileStamp> {
        let md = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: md.modified().ok(),
            len: md.len(),
        })
    }
}

pub struct AgentState {
    pub cfg: Config,
    pub engine: Engine,
    pub sources: BTreeMap<PathBuf, SourceState>,
    /// Grows with every applied policy change.
    pub revision: u64,
    pub audit_global: bool,
    pub audit_endpoints: BTreeMap<u16, bool>,
    pub proxy_ports: ProxyPorts,
    /// Learned names and their identities.
    pub fqdn: FqdnCache,
    /// The engine's numeric identity of each FQDN identity the cache uses.
    pub fqdn_ids: HashMap<FqdnIdentity, (u32, LabelSet)>,
    /// Each learned IP in the ipcache: its cache identity and, when policies name prefixes
    /// containing it, the numeric identity of its selector set plus those `cidr:` labels
    /// (one engine reference per IP).
    pub fqdn_ips: HashMap<IpNet, FqdnIp>,
    /// Endpoint of each source address (a query's endpoint is found from its source).
    pub by_ip: HashMap<IpAddr, u16>,
    /// The DNS rules of each (endpoint, server identity, port, protocol) seen, compiled into
    /// an index so a query is matched against thousands of patterns without a linear regex
    /// scan. Behind its own lock because the proxy's check only reads the state.
    dns_matchers: Mutex<HashMap<DnsFlow, Arc<DnsMatcher>>>,
}

/// A DNS flow as its rules are selected: endpoint, server identity, port, IP protocol.
type DnsFlow = (u16, u32, u16, u8);

/// The names one flow may resolve.
pub enum DnsMatcher {
    Deny,
    All,
    Some(PatternIndex),
}

impl DnsMatcher {
    fn from_verdict(v: Option<DnsVerdict>) -> DnsMatcher {
        match v {
            None | Some(DnsVerdict::Denied { .. }) => DnsMatcher::Deny,
            Some(DnsVerdict::Unrestricted) => DnsMatcher::All,
            Some(DnsVerdict::Rules {
                allow_all: true, ..
            }) => DnsMatcher::All,
            Some(v @ DnsVerdict::Rules { .. }) => {
                let sels: Vec<FqdnSelector> = v
                    .dns_rules()
                    .map(|(r, _)| match r {
                        DnsRule::MatchName(n) => FqdnSelector::MatchName(n.clone()),
                        DnsRule::MatchPattern(p) => FqdnSelector::MatchPattern(p.clone()),
                    })
                    .collect();
                DnsMatcher::Some(PatternIndex::new(
                    sels.iter().enumerate().map(|(i, s)| (i as u32, s)),
                ))
            }
        }
    }

    pub fn allows(&self, name: &DnsName) -> bool {
        match self {
            DnsMatcher::Deny => false,
            DnsMatcher::All => true,
            DnsMatcher::Some(index) => index.is_match(name),
        }
    }

    pub fn decide(&self, endpoint_id: u16, name: &DnsName) -> Decision {
        if self.allows(name) {
            Decision::Allow { endpoint_id }
        } else {
            Decision::Deny { endpoint_id }
        }
    }
}

impl AgentState {
    /// An engine with the config's endpoints and no policy yet. The returned changes are what
    /// a datapath must apply to match it.
    pub fn new(
        cfg: Config,
        identities: IdentityAllocator,
        proxy_ports: ProxyPorts,
    ) -> (AgentState, Vec<Changes>) {
        let mut engine = Engine::new(identities, proxy_ports);
        let mut changes = Vec::new();
        let mut by_ip = HashMap::new();
        for ep in cfg.policy_endpoints() {
            for ip in &ep.ips {
                by_ip.insert(*ip, ep.id);
            }
            changes.push(engine.upsert_endpoint(ep));
        }
        let fqdn = FqdnCache::new(fqdn_cache::Config {
            min_ttl: cfg.dns.min_ttl,
            max_ips_per_hostname: cfg.dns.max_ips_per_hostname,
            ..fqdn_cache::Config::default()
        });
        let state = AgentState {
            fqdn,
            fqdn_ids: HashMap::new(),
            fqdn_ips: HashMap::new(),
            dns_matchers: Mutex::new(HashMap::new()),
            by_ip,
            audit_global: cfg.policy_audit_mode,
            cfg,
            engine,
            sources: BTreeMap::new(),
            revision: 0,
            audit_endpoints: BTreeMap::new(),
            proxy_ports,
        };
        (state, changes)
    }

    /// The proxy ports map entries carry: the DNS proxy's listening port.
    pub fn default_proxy_ports(cfg: &Config) -> ProxyPorts {
        ProxyPorts {
            dns: cfg.dns.listen.first().map(|a| a.port()).unwrap_or(0),
            http: 0,
            kafka: 0,
        }
    }

    /// The state an offline command sees: config endpoints and every valid policy file.
    /// Invalid files are left out and described in the returned problems.
    pub fn offline(cfg: Config) -> anyhow::Result<(AgentState, Vec<String>)> {
        let ports = AgentState::default_proxy_ports(&cfg);
        let (mut state, _) = AgentState::new(cfg, IdentityAllocator::new(), ports);
        let problems = state.sync_policy_dir().1;
        Ok((state, problems))
    }

    /// Reads the policy directory and applies every added, changed or removed file. A file
    /// whose new content is invalid keeps its previous content in force. Returns the engine's
    /// changes (one per applied file) and a description of each problem.
    pub fn sync_policy_dir(&mut self) -> (Vec<Changes>, Vec<String>) {
        let dir = self.cfg.policy_dir.clone();
        let mut changes = Vec::new();
        let mut problems = Vec::new();
        let files = match policies::policy_files(&dir) {
            Ok(f) => f,
            Err(e) => {
                // An unreadable directory changes nothing: the policy in force stays.
                problems.push(format!(
                    "cannot read policy directory {}: {e}",
                    dir.display()
                ));
                return (changes, problems);
            }
        };
        let gone: Vec<PathBuf> = self
            .sources
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect();
        for path in gone {
            self.sources.remove(&path);
            changes.push(self.engine.set_policies(&source_name(&path), Vec::new()));
            self.revision += 1;
            self.selectors_changed(&mut changes);
            tracing::info!(file = %path.display(), revision = self.revision, "policy file removed");
        }
        for path in files {
            let stamp = FileStamp::of(&path);
            if let Some(s) = self.sources.get(&path) {
                if s.stamp.is_some() && s.stamp == stamp {
                    continue;
                }
            }
            let loaded = policies::load(&path);
            self.sources.entry(path.clone()).or_default().stamp = stamp;
            match loaded {
                Loaded::Ok(p) => {
                    let n = p.len();
                    if let Some(entry) = self.sources.get_mut(&path) {
                        entry.policies = n;
                        entry.valid = true;
                        entry.errors.clear();
                    }
                    changes.push(self.engine.set_policies(&source_name(&path), p));
                    self.revision += 1;
                    self.selectors_changed(&mut changes);
                    tracing::info!(
                        file = %path.display(),
                        policies = n,
                        revision = self.revision,
                        "policy file applied"
                    );
                }
                Loaded::Invalid(diags) => {
                    if let Some(entry) = self.sources.get_mut(&path) {
                        entry.valid = false;
                        entry.errors = diags.iter().map(|d| d.to_string()).collect();
                    }
                    for d in &diags {
                        tracing::error!("{d}");
                    }
                    problems.push(format!(
                        "{}: refused ({} {}); the previous content stays in force",
                        path.display(),
                        diags.len(),
                        if diags.len() == 1 { "error" } else { "errors" }
                    ));
                    problems.extend(diags.iter().map(|d| d.to_string()));
                }
                Loaded::Io(e) => {
                    if let Some(entry) = self.sources.get_mut(&path) {
                        entry.valid = false;
                        entry.errors = vec![format!("{}: cannot read: {e}", path.display())];
                        // Read again next time: the stamp of an unreadable file says nothing.
                        entry.stamp = None;
                    }
                    tracing::error!(file = %path.display(), "cannot read policy file: {e}");
                    problems.push(format!("{}: cannot read: {e}", path.display()));
                }
            }
        }
        (changes, problems)
    }

    /// Tells the FQDN cache the `toFQDNs` selectors now in force: a new one selects the names
    /// already learned at once, a removed one releases what only it needed.
    fn selectors_changed(&mut self, changes: &mut Vec<Changes>) {
        let fc = self.fqdn.set_selectors(self.engine.fqdn_selectors());
        changes.extend(self.apply_fqdn_changes(fc));
        if changes.iter().any(|c| c.prefixes_changed) && !self.fqdn_ips.is_empty() {
            self.relabel_fqdn_ips(changes);
        }
    }

    /// Turns what the FQDN cache changed into engine changes, in the cache's order: identities
    /// first (their map entries go to the datapath before any IP carries them), then ipcache
    /// upserts and deletes, then released identities.
    pub fn apply_fqdn_changes(&mut self, fc: fqdn_cache::Changes) -> Vec<Changes> {
        let mut out = Vec::new();
        for (fid, labels) in fc.identities_added {
            let (num, c) = self.engine.upsert_identity(labels.clone());
            self.fqdn_ids.insert(fid, (num, labels));
            out.push(c);
        }
        for (prefix, fid) in fc.ipcache_upserts {
            if !self.fqdn_ids.contains_key(&fid) {
                tracing::error!(%prefix, "learned IP carries an identity the engine does not know");
                continue;
            }
            self.place_fqdn_ip(prefix, fid, &mut out);
        }
        for prefix in fc.ipcache_deletes {
            out.push(self.engine.delete_prefix(prefix));
            if let Some(old) = self.fqdn_ips.remove(&prefix) {
                self.release_derived(old, &mut out);
            }
        }
        for fid in fc.identities_released {
            if let Some((num, _)) = self.fqdn_ids.remove(&fid) {
                out.push(self.engine.release_identity(num));
            }
        }
        out
    }

    /// Puts a learned IP into the ipcache with the identity it must carry: its selector set's,
    /// plus a `cidr:` label for each policy prefix containing it, so that CIDR rules still
    /// select the IP when its /32 (or /128) entry shadows the prefix's own entry. The engine
    /// keeps one reference per IP on such a derived identity.
    fn place_fqdn_ip(&mut self, prefix: IpNet, fid: FqdnIdentity, out: &mut Vec<Changes>) {
        let Some((base, labels)) = self.fqdn_ids.get(&fid).cloned() else {
            return;
        };
        let cidr = self.engine.prefix_labels_for(prefix.addr());
        let entry = if cidr.is_empty() {
            FqdnIp {
                cache: fid,
                identity: base,
                derived: false,
            }
        } else {
            let mut all = labels.labels().to_vec();
            all.extend(cidr);
            let (num, c) = self.engine.upsert_identity(LabelSet::new(all));
            out.push(c);
            FqdnIp {
                cache: fid,
                identity: num,
                derived: true,
            }
        };
        out.push(self.engine.upsert_prefix(prefix, entry.identity));
        // The old identity goes only after the IP carries the new one.
        if let Some(old) = self.fqdn_ips.insert(prefix, entry) {
            self.release_derived(old, out);
        }
    }

    fn release_derived(&mut self, ip: FqdnIp, out: &mut Vec<Changes>) {
        if ip.derived {
            out.push(self.engine.release_identity(ip.identity));
        }
    }

    /// The prefixes named by policies changed: learned IPs get the `cidr:` labels that now
    /// apply to them.
    fn relabel_fqdn_ips(&mut self, out: &mut Vec<Changes>) {
        let ips: Vec<(IpNet, FqdnIdentity)> =
            self.fqdn_ips.iter().map(|(p, e)| (*p, e.cache)).collect();
        for (prefix, fid) in ips {
            self.place_fqdn_ip(prefix, fid, out);
        }
    }

    /// The DNS proxy's question, per flow: what decides whether the endpoint at `client` may
    /// resolve a name through `server`. `None` when `client` is no endpoint's; else the
    /// endpoint and the compiled DNS rules for (server identity, port, protocol), which
    /// [`DnsMatcher::decide`] applies to each name: allowed when a DNS rule matches the name;
    /// with no DNS rules and no egress enforcement every name is allowed (and its answer
    /// learned, for visibility). Valid until the next change the agent submits (see
    /// `Agent::dns_epoch`).
    pub fn dns_flow(
        &self,
        client: IpAddr,
        server: SocketAddr,
        transport: Transport,
    ) -> Option<(u16, Arc<DnsMatcher>)> {
        let &endpoint_id = self.by_ip.get(&client).or_else(|| {
            // IPv4-mapped IPv6 sources from dual-stack sockets belong to the IPv4 address.
            match client {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .and_then(|v4| self.by_ip.get(&IpAddr::V4(v4))),
                IpAddr::V4(_) => None,
            }
        })?;
        let server_identity = self
            .engine
            .ipcache()
            .lookup(server.ip())
            .map(|(_, id)| id)
            .unwrap_or(policy::identity::reserved::WORLD);
        let proto = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        let key = (endpoint_id, server_identity, server.port(), proto.number());
        let matcher = {
            let mut cache = self.dns_matchers.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(DnsMatcher::from_verdict(self.engine.dns_rules_for(
                        endpoint_id,
                        server_identity,
                        server.port(),
                        proto,
                    )))
                })
                .clone()
        };
        Some((endpoint_id, matcher))
    }

    /// Drops the compiled DNS matchers: called whenever policy map entries change (which is
    /// when the DNS rules of a flow can change). Learning an IP of an existing selector set
    /// changes only the ipcache and keeps them.
    pub fn forget_dns_matchers(&self) {
        self.dns_matchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn audit_modes(&self) -> AuditModes {
        AuditModes {
            global: self.audit_global,
            endpoints: self
                .audit_endpoints
                .iter()
                .filter(|(_, on)| **on)
                .map(|(id, _)| *id)
                .collect(),
        }
    }

    /// An endpoint by name or numeric id.
    pub fn find_endpoint(&self, key: &str) -> Option<&policy::model::Endpoint> {
        self.engine.find_endpoint(key)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn trace(
        &self,
        src: &PeerSel,
        src_text: &str,
        dst: &PeerSel,
        dst_text: &str,
        port: u16,
        proto: Protocol,
        mode: &str,
    ) -> Result<TraceView, String> {
        for sel in [src, dst] {
            if let PeerSel::Endpoint(name) = sel {
                if self.find_endpoint(name).is_none() {
                    return Err(format!(
                        "no endpoint {name:?} (endpoints: {})",
                        self.engine
                            .endpoints()
                            .map(|e| e.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        let sp = src.to_trace_peer(&self.cfg);
        let dp = dst.to_trace_peer(&self.cfg);
        let t: Trace =
            policy::trace::trace(&self.engine, &sp, &dp, port, proto, &self.audit_modes())
                .map_err(|e| e.to_string())?;
        let peer = |text: &str, id: u32| TracePeerView {
            selector: text.to_string(),
            identity: id,
            labels: self
                .engine
                .identities()
                .get(id)
                .map(|i| i.labels.labels().iter().map(|l| l.to_string()).collect())
                .unwrap_or_default(),
        };
        // A `labels:` peer is a hypothetical endpoint: name it as the user wrote it.
        let mut egress = dir_view(&t.egress);
        if matches!(src, PeerSel::Labels(_)) && egress.endpoint.is_some() {
            egress.endpoint = Some(src_text.to_string());
        }
        let mut ingress = dir_view(&t.ingress);
        if matches!(dst, PeerSel::Labels(_)) && ingress.endpoint.is_some() {
            ingress.endpoint = Some(dst_text.to_string());
        }
        Ok(TraceView {
            verdict: verdict_str(t.verdict).to_string(),
            egress,
            ingress,
            src: peer(src_text, t.src_identity),
            dst: peer(dst_text, t.dst_identity),
            dport: port,
            protocol: proto.as_str().to_string(),
            mode: mode.to_string(),
        })
    }

    pub fn endpoint_view(&self, ep: &policy::model::Endpoint) -> EndpointView {
        let enf = self.engine.enforcement(ep.id).unwrap_or_default();
        let identity = self.engine.endpoint_identity(ep.id).unwrap_or(0);
        EndpointView {
            id: ep.id,
            name: ep.name.clone(),
            identity,
            labels: ep
                .labels
                .labels()
                .iter()
                .map(|l| (format!("{}:{}", l.source, l.key), l.value.clone()))
                .collect(),
            ips: ep.ips.clone(),
            policy_enforcement: Enforcement {
                ingress: enf.ingress,
                egress: enf.egress,
            },
            audit_mode: self.audit_global
                || self.audit_endpoints.get(&ep.id).copied().unwrap_or(false),
            is_host: ep.is_host,
            interface: self
                .cfg
                .endpoints
                .iter()
                .find(|c| c.id == ep.id)
                .and_then(|c| c.interface.clone()),
        }
    }

    pub fn endpoint_views(&self) -> Vec<EndpointView> {
        let mut v: Vec<EndpointView> = self
            .engine
            .endpoints()
            .map(|e| self.endpoint_view(e))
            .collect();
        v.sort_by_key(|e| e.id);
        v
    }

    pub fn identity_views(&self) -> Vec<IdentityView> {
        let mut v: Vec<IdentityView> = self
            .engine
            .identities()
            .iter()
            .map(|i| IdentityView {
                id: i.id,
                labels: i.labels.labels().iter().map(|l| l.to_string()).collect(),
            })
            .collect();
        v.sort_by_key(|i| i.id);
        v
    }

    pub fn policy_view(&self) -> PolicyGetView {
        let mut policies: Vec<PolicyRuleCount> = self
            .engine
            .policies()
            .map(|(_, p)| PolicyRuleCount {
                policy: p.display_name(),
                kind: p.kind.as_str().to_string(),
                file: p.file.to_string(),
                line: p.span.line,
                rules: p.rules.len(),
            })
            .collect();
        policies.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        PolicyGetView {
            revision: self.revision,
            policy_dir: self.cfg.policy_dir.display().to_string(),
            policies,
            sources: self
                .sources
                .iter()
                .map(|(p, s)| PolicySourceView {
                    file: p.display().to_string(),
                    valid: s.valid,
                    policies: s.policies,
                    errors: s.errors.clone(),
                })
                .collect(),
        }
    }

    /// Every source's refusal, one line each, for `status`.
    pub fn policy_errors(&self) -> Vec<String> {
        self.sources
            .values()
            .flat_map(|s| s.errors.iter().cloned())
            .collect()
    }
}

/// The engine's name for a policy file's contribution: its path as displayed.
pub fn source_name(path: &Path) -> String {
    path.display().to_string()
}

pub fn verdict_str(v: Verdict) -> &'static str {
    v.as_str()
}

fn dir_view(d: &DirTrace) -> DirTraceView {
    DirTraceView {
        verdict: verdict_str(d.verdict).to_string(),
        rules: d
            .rules
            .iter()
            .map(|r| RuleView {
                policy: r.policy.to_string(),
                kind: r.kind.as_str().to_string(),
                file: r.file.to_string(),
                line: r.span.line,
                column: r.span.column,
            })
            .collect(),
        enforced: d.enforced,
        endpoint: d.endpoint.clone(),
        reason: d.reason.clone(),
        proxy_port: d.proxy_port,
    }
}

/// One policy map's rows in the JSON shape of `bpf policy get`.
pub fn map_rows(rows: Vec<MapRow>) -> Vec<MapEntryView> {
    rows.into_iter()
        .map(
            |MapRow {
                 key: k,
                 entry: e,
                 packets,
                 bytes,
             }| {
                // Port 0 with prefix 0 is "any port": shown as 0, as the contract says.
                let end_port = if k.prefix_len == 0 { 0 } else { k.end_port() };
                let mut rules: Vec<String> = e.rules.iter().map(|r| r.policy.to_string()).collect();
                rules.dedup();
                MapEntryView {
                    policy: if e.deny { "Deny" } else { "Allow" }.to_string(),
                    direction: match k.direction {
                        Direction::Ingress => "Ingress",
                        Direction::Egress => "Egress",
                    }
                    .to_string(),
                    identity: k.identity,
                    port: k.port,
                    end_port,
                    protocol: Protocol::from_number(k.protocol)
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| k.protocol.to_string()),
                    proxy_port: e.proxy_port,
                    packets,
                    bytes,
                    rules,
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::mapstate::{MapEntry, MapKey};

    fn row(identity: u32, proto: u8, port: u16, prefix_len: u8, proxy: u16) -> MapRow {
        MapRow {
            key: MapKey {
                identity,
                direction: Direction::Egress,
                protocol: proto,
                port,
                prefix_len,
            },
            entry: MapEntry {
                deny: false,
                proxy_port: proxy,
                l7: None,
                rules: Vec::new().into(),
            },
            packets: 3,
            bytes: 180,
        }
    }

    #[test]
    fn map_rows_show_ports_ranges_and_protocols_as_the_contract_says() {
        let rows = map_rows(vec![
            row(0, 0, 0, 0, 0),
            row(257, 6, 443, 16, 0),
            row(9, 17, 8080, 14, 0),
            row(2, 17, 53, 16, 5353),
        ]);
        let ends: Vec<(u16, u16, &str)> = rows
            .iter()
            .map(|r| (r.port, r.end_port, r.protocol.as_str()))
            .collect();
        assert_eq!(
            ends,
            vec![
                (0, 0, "ANY"),
                (443, 443, "TCP"),
                (8080, 8083, "UDP"),
                (53, 53, "UDP")
            ]
        );
        assert_eq!(rows[3].proxy_port, 5353);
        assert_eq!(rows[0].policy, "Allow");
        assert_eq!(rows[0].direction, "Egress");
        assert_eq!((rows[1].packets, rows[1].bytes), (3, 180));
    }
}
