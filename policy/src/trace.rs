//! Flow verdicts with the rules that decided them (policy trace).
//!
//! A flow is judged twice, as the datapath judges it: by the source endpoint's egress map
//! (when the source is a local endpoint) and by the destination endpoint's ingress map (when
//! the destination is one). Each side is a real map lookup — the stored map of a real endpoint
//! and peer, or the same entries computed on the spot for a `labels:` peer (a hypothetical
//! endpoint that has no map) — so the trace never disagrees with enforcement.
//!
//! Peers: `endpoint:` by name or id; `labels:` a hypothetical endpoint (namespace `default`
//! unless given); `ip:` through the ipcache (an endpoint's address is that endpoint, the host's
//! the host endpoint); `entity:` the reserved identity (`host` = the host endpoint). `cluster`
//! and `all` name many identities and cannot be traced as one peer.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::engine::Engine;
use crate::error::PolicyError;
use crate::identity::{reserved, NumericIdentity, HYPOTHETICAL_IDENTITY};
use crate::labels::{Label, LabelSet, NAMESPACE_LABEL, SOURCE_K8S};
use crate::mapstate::{LookupVerdict, MapKey, MapState, RuleRef};
use crate::model::{Direction, Endpoint, Entity, L7Kind, Protocol};
use crate::selector::IdentityFacts;

/// One side of a traced flow, as the CLI's `SEL` names it.
#[derive(Debug, Clone, PartialEq)]
pub enum TracePeer {
    /// `endpoint:NAME` (or numeric id).
    Endpoint(String),
    /// `labels:K=V,...`: a hypothetical endpoint with these labels.
    Labels(LabelSet),
    /// `ip:ADDR`.
    Ip(IpAddr),
    /// `entity:NAME`.
    Entity(Entity),
}

/// Audit modes in force: global, and per endpoint id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditModes {
    pub global: bool,
    pub endpoints: BTreeSet<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Would be dropped, but audit mode lets it pass (and records it).
    Audit,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Audit => "audit",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict of one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct DirTrace {
    pub verdict: Verdict,
    /// Whether the direction is in default deny for the local endpoint.
    pub enforced: bool,
    /// The local endpoint judging this direction (`None`: the peer is not a local endpoint).
    pub endpoint: Option<String>,
    /// One sentence saying why.
    pub reason: String,
    /// The rules that decided: of the matching entry, or the rules enforcing default deny.
    pub rules: Vec<Arc<RuleRef>>,
    /// Redirect of an allowed flow (0 = none).
    pub proxy_port: u16,
    pub l7: Option<L7Kind>,
    /// The map entry that decided, if one did.
    pub key: Option<MapKey>,
}

/// The verdict of a flow.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Denied if a side denies, audit if a side audits, else allowed.
    pub verdict: Verdict,
    /// The source endpoint's egress.
    pub egress: DirTrace,
    /// The destination endpoint's ingress.
    pub ingress: DirTrace,
    /// Identity numbers of source and destination (a `labels:` peer without an identity
    /// yet shows [`HYPOTHETICAL_IDENTITY`]).
    pub src_identity: NumericIdentity,
    pub dst_identity: NumericIdentity,
}

struct Side {
    /// The local endpoint (real or hypothetical), if this side is one.
    endpoint: Option<Endpoint>,
    /// Its id when it is a real endpoint (then its stored map is used).
    stored: Option<u16>,
    facts: IdentityFacts,
}

fn facts_of(engine: &Engine, id: NumericIdentity) -> IdentityFacts {
    match engine.selector_cache().identity_facts(id) {
        Some(f) => f.clone(),
        None => IdentityFacts::new(
            id,
            engine
                .identities()
                .get(id)
                .map(|i| i.labels.clone())
                .unwrap_or_default(),
        ),
    }
}

fn endpoint_side(engine: &Engine, ep: &Endpoint) -> Side {
    let id = engine.endpoint_identity(ep.id).unwrap_or(reserved::UNKNOWN);
    Side {
        endpoint: Some(ep.clone()),
        stored: Some(ep.id),
        facts: facts_of(engine, id),
    }
}

fn identity_side(engine: &Engine, id: NumericIdentity) -> Side {
    Side {
        endpoint: None,
        stored: None,
        facts: facts_of(engine, id),
    }
}

fn resolve(engine: &Engine, peer: &TracePeer) -> Result<Side, PolicyError> {
    match peer {
        TracePeer::Endpoint(name) => engine
            .find_endpoint(name)
            .map(|ep| endpoint_side(engine, ep))
            .ok_or_else(|| PolicyError::NotFound(format!("no endpoint named {name:?}"))),
        TracePeer::Labels(labels) => {
            let mut v = labels.labels().to_vec();
            if labels.get(None, NAMESPACE_LABEL).is_none() {
                v.push(Label::new(SOURCE_K8S, NAMESPACE_LABEL, "default"));
            }
            let labels = LabelSet::new(v);
            let id = engine
                .identities()
                .lookup(&labels)
                .unwrap_or(HYPOTHETICAL_IDENTITY);
            let facts = if id == HYPOTHETICAL_IDENTITY {
                IdentityFacts::new(id, labels.clone())
            } else {
                facts_of(engine, id)
            };
            let name = format!(
                "labels:{}",
                labels
                    .labels()
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Ok(Side {
                endpoint: Some(Endpoint {
                    id: u16::MAX,
                    name,
                    labels,
                    ips: Vec::new(),
                    named_ports: Default::default(),
                    is_host: false,
                }),
                stored: None,
                facts,
            })
        }
        TracePeer::Ip(ip) => {
            if let Some(ep) = engine.endpoint_by_ip(*ip) {
                return Ok(endpoint_side(engine, ep));
            }
            let id = engine.ipcache().identity_of(*ip);
            if id == reserved::HOST {
                if let Some(h) = engine.host_endpoint() {
                    return Ok(endpoint_side(engine, h));
                }
            }
            Ok(identity_side(engine, id))
        }
        TracePeer::Entity(e) => {
            let id = match e {
                Entity::Host => {
                    if let Some(h) = engine.host_endpoint() {
                        return Ok(endpoint_side(engine, h));
                    }
                    reserved::HOST
                }
                Entity::World => reserved::WORLD,
                Entity::WorldIpv4 => reserved::WORLD_IPV4,
                Entity::WorldIpv6 => reserved::WORLD_IPV6,
                Entity::RemoteNode => reserved::REMOTE_NODE,
                Entity::KubeApiserver => reserved::KUBE_APISERVER,
                Entity::Ingress => reserved::INGRESS,
                Entity::Init => reserved::INIT,
                Entity::Health => reserved::HEALTH,
                Entity::Unmanaged => reserved::UNMANAGED,
                Entity::Cluster | Entity::All => {
                    return Err(PolicyError::NotFound(format!(
                        "entity {} stands for many identities; trace one endpoint, address or \
                         entity instead",
                        e.as_str()
                    )))
                }
            };
            Ok(identity_side(engine, id))
        }
    }
}

fn judge(
    engine: &Engine,
    local: &Side,
    peer: &Side,
    dir: Direction,
    proto: u8,
    port: u16,
    audit: &AuditModes,
) -> DirTrace {
    let Some(ep) = &local.endpoint else {
        return DirTrace {
            verdict: Verdict::Allowed,
            enforced: false,
            endpoint: None,
            reason: format!(
                "{} side is not a local endpoint: no policy applies here",
                match dir {
                    Direction::Egress => "the source",
                    Direction::Ingress => "the destination",
                }
            ),
            rules: Vec::new(),
            proxy_port: 0,
            l7: None,
            key: None,
        };
    };
    let peer_id = peer.facts.id;
    let computed;
    let policy_owned;
    let policy = match local.stored.and_then(|id| engine.stored_policy(id)) {
        Some(p) => p,
        None => {
            policy_owned = engine.policy_for(ep);
            &policy_owned
        }
    };
    let dp = policy.get(dir);
    let stored_map = local.stored.and_then(|id| engine.map_state(id));
    let map: &MapState = match stored_map {
        Some(m) if engine.selector_cache().has_identity(peer_id) => m,
        _ => {
            let sels = engine.selectors_for(&peer.facts);
            let mut m = MapState::new();
            let e = engine.compute_entries(ep, dp, dir, peer_id, &sels);
            m.set_identity(dir, peer_id, e);
            let e0 = engine.compute_entries(ep, dp, dir, 0, &[]);
            m.set_identity(dir, 0, e0);
            computed = m;
            &computed
        }
    };
    let l = map.lookup(peer_id, dir, proto, port);
    let audited = audit.global || (local.stored.is_some() && audit.endpoints.contains(&ep.id));
    let drop_verdict = if audited {
        Verdict::Audit
    } else {
        Verdict::Denied
    };
    let dir_name = match dir {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let (verdict, reason, rules, proxy_port, l7) = match (l.verdict, l.entry) {
        (LookupVerdict::Allow, Some(e)) => {
            let reason = if e.rules.is_empty() {
                format!("no rule puts {dir_name} of this endpoint into default deny")
            } else if let Some(k) = e.l7 {
                format!(
                    "allowed and redirected to the {} proxy",
                    match k {
                        L7Kind::Dns => "DNS",
                        L7Kind::Http => "HTTP",
                        L7Kind::Kafka => "Kafka",
                    }
                )
            } else {
                "allowed by a rule".to_string()
            };
            (
                Verdict::Allowed,
                reason,
                e.rules.to_vec(),
                e.proxy_port,
                e.l7,
            )
        }
        (LookupVerdict::Deny, Some(e)) => (
            drop_verdict,
            "denied by a deny rule".to_string(),
            e.rules.to_vec(),
            0,
            None,
        ),
        _ => (
            drop_verdict,
            format!("default deny: {dir_name} is enforced and no rule allows this flow"),
            dp.enforcing.clone(),
            0,
            None,
        ),
    };
    DirTrace {
        verdict,
        enforced: dp.enforced,
        endpoint: Some(ep.name.clone()),
        reason,
        rules,
        proxy_port,
        l7,
        key: l.key,
    }
}

/// Traces one flow `src` → `dst` on destination `port` (ICMP: the type) and `proto`.
pub fn trace(
    engine: &Engine,
    src: &TracePeer,
    dst: &TracePeer,
    port: u16,
    proto: Protocol,
    audit: &AuditModes,
) -> Result<Trace, PolicyError> {
    let s = resolve(engine, src)?;
    let d = resolve(engine, dst)?;
    let egress = judge(
        engine,
        &s,
        &d,
        Direction::Egress,
        proto.number(),
        port,
        audit,
    );
    let ingress = judge(
        engine,
        &d,
        &s,
        Direction::Ingress,
        proto.number(),
        port,
        audit,
    );
    let verdict = if egress.verdict == Verdict::Denied || ingress.verdict == Verdict::Denied {
        Verdict::Denied
    } else if egress.verdict == Verdict::Audit || ingress.verdict == Verdict::Audit {
        Verdict::Audit
    } else {
        Verdict::Allowed
    };
    Ok(Trace {
        verdict,
        egress,
        ingress,
        src_identity: s.facts.id,
        dst_identity: d.facts.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{engine, ep, host, pols};

    const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toCIDR: [203.0.113.0/24]
  egressDeny:
  - toCIDR: [203.0.113.66/32]
"#;

    fn setup() -> Engine {
        let mut e = engine();
        e.upsert_endpoint(ep(1, "web", "prod", &[("app", "web")], &["10.0.0.1"]));
        e.upsert_endpoint(ep(2, "db", "prod", &[("app", "db")], &["10.0.0.2"]));
        e.upsert_endpoint(host(100, &[], &["192.168.1.10"]));
        e.set_policies("web.yaml", pols("web.yaml", POLICY));
        e
    }

    fn t(e: &Engine, src: TracePeer, dst: TracePeer, port: u16, proto: Protocol) -> Trace {
        trace(e, &src, &dst, port, proto, &AuditModes::default()).unwrap()
    }

    fn lbl(pairs: &[(&str, &str)]) -> TracePeer {
        TracePeer::Labels(LabelSet::new(
            pairs.iter().map(|(k, v)| Label::k8s(k, v)).collect(),
        ))
    }

    #[test]
    fn endpoint_to_endpoint_both_sides() {
        let e = setup();
        let tr = t(
            &e,
            TracePeer::Endpoint("web".into()),
            TracePeer::Endpoint("db".into()),
            5432,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Allowed);
        assert!(tr.egress.enforced);
        assert_eq!(&*tr.egress.rules[0].policy, "prod/web");
        assert_eq!(&*tr.egress.rules[0].file, "web.yaml");
        assert_eq!(tr.egress.endpoint.as_deref(), Some("web"));
        assert!(!tr.ingress.enforced);
        assert!(tr.ingress.rules.is_empty());
        let tr = t(
            &e,
            TracePeer::Endpoint("1".into()),
            TracePeer::Endpoint("db".into()),
            22,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Denied);
        assert_eq!(tr.egress.verdict, Verdict::Denied);
        assert!(tr.egress.reason.contains("default deny"));
        assert_eq!(tr.egress.rules.len(), 1, "the enforcing rule is named");
        assert!(trace(
            &e,
            &TracePeer::Endpoint("nope".into()),
            &TracePeer::Endpoint("db".into()),
            1,
            Protocol::Tcp,
            &AuditModes::default()
        )
        .is_err());
    }

    #[test]
    fn hypothetical_labels_peer() {
        let e = setup();
        // No endpoint has these labels: evaluated as a hypothetical endpoint in `prod`.
        let tr = t(
            &e,
            lbl(&[("app", "client"), ("io.kubernetes.pod.namespace", "prod")]),
            TracePeer::Endpoint("web".into()),
            80,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Allowed);
        assert_eq!(tr.src_identity, HYPOTHETICAL_IDENTITY);
        assert_eq!(tr.ingress.proxy_port, crate::engine::tests::PORTS.http);
        assert_eq!(tr.ingress.l7, Some(L7Kind::Http));
        // Namespace defaults to `default`: not selected by the namespaced rule.
        let tr = t(
            &e,
            lbl(&[("app", "client")]),
            TracePeer::Endpoint("web".into()),
            80,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Denied);
        assert_eq!(tr.ingress.verdict, Verdict::Denied);
        // A hypothetical web endpoint gets the web policy as its own.
        let tr = t(
            &e,
            lbl(&[("app", "web"), ("io.kubernetes.pod.namespace", "prod")]),
            TracePeer::Endpoint("db".into()),
            5432,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Allowed);
        assert!(tr.egress.enforced);
        // Labels of an existing endpoint: its identity is used.
        let tr = t(
            &e,
            lbl(&[("app", "db"), ("io.kubernetes.pod.namespace", "prod")]),
            TracePeer::Endpoint("web".into()),
            80,
            Protocol::Tcp,
        );
        assert_eq!(tr.src_identity, e.endpoint_identity(2).unwrap());
        assert_eq!(tr.verdict, Verdict::Denied);
    }

    #[test]
    fn ip_and_entity_peers() {
        let e = setup();
        let web = TracePeer::Endpoint("web".into());
        let tr = t(
            &e,
            web.clone(),
            TracePeer::Ip("203.0.113.5".parse().unwrap()),
            443,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Allowed);
        assert_eq!(tr.ingress.endpoint, None);
        let tr = t(
            &e,
            web.clone(),
            TracePeer::Ip("203.0.113.66".parse().unwrap()),
            443,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Denied);
        assert!(tr.egress.reason.contains("deny rule"));
        let tr = t(
            &e,
            web.clone(),
            TracePeer::Ip("10.0.0.2".parse().unwrap()),
            5432,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Allowed);
        assert_eq!(tr.ingress.endpoint.as_deref(), Some("db"));
        let tr = t(
            &e,
            web.clone(),
            TracePeer::Entity(Entity::World),
            443,
            Protocol::Tcp,
        );
        assert_eq!(tr.verdict, Verdict::Denied);
        assert_eq!(tr.dst_identity, reserved::WORLD);
        let tr = t(
            &e,
            web.clone(),
            TracePeer::Entity(Entity::Host),
            22,
            Protocol::Tcp,
        );
        assert_eq!(tr.ingress.endpoint.as_deref(), Some("host"));
        assert_eq!(tr.dst_identity, reserved::HOST);
        let tr = t(
            &e,
            TracePeer::Ip("192.168.1.10".parse().unwrap()),
            TracePeer::Endpoint("db".into()),
            1,
            Protocol::Udp,
        );
        assert_eq!(tr.egress.endpoint.as_deref(), Some("host"));
        // World as the source: no egress policy applies, the destination's ingress decides.
        let tr = t(&e, TracePeer::Entity(Entity::World), web, 80, Protocol::Tcp);
        assert_eq!(tr.egress.verdict, Verdict::Allowed);
        assert_eq!(tr.ingress.verdict, Verdict::Denied);
        assert!(trace(
            &e,
            &TracePeer::Entity(Entity::Cluster),
            &TracePeer::Entity(Entity::World),
            1,
            Protocol::Tcp,
            &AuditModes::default()
        )
        .is_err());
    }

    #[test]
    fn audit_modes() {
        let e = setup();
        let (web, db) = (
            TracePeer::Endpoint("web".into()),
            TracePeer::Endpoint("db".into()),
        );
        let global = AuditModes {
            global: true,
            ..Default::default()
        };
        let tr = trace(&e, &web, &db, 22, Protocol::Tcp, &global).unwrap();
        assert_eq!(
            (tr.verdict, tr.egress.verdict),
            (Verdict::Audit, Verdict::Audit)
        );
        let per_ep = AuditModes {
            global: false,
            endpoints: [1u16].into_iter().collect(),
        };
        assert_eq!(
            trace(&e, &web, &db, 22, Protocol::Tcp, &per_ep)
                .unwrap()
                .verdict,
            Verdict::Audit
        );
        let other = AuditModes {
            global: false,
            endpoints: [2u16].into_iter().collect(),
        };
        assert_eq!(
            trace(&e, &web, &db, 22, Protocol::Tcp, &other)
                .unwrap()
                .verdict,
            Verdict::Denied
        );
        // Allowed flows stay allowed.
        assert_eq!(
            trace(&e, &web, &db, 5432, Protocol::Tcp, &global)
                .unwrap()
                .verdict,
            Verdict::Allowed
        );
    }

    #[test]
    fn learned_fqdn_address_counts_when_live() {
        let mut e = setup();
        e.set_policies(
            "f.yaml",
            pols(
                "f.yaml",
                r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: f, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#,
            ),
        );
        let db = TracePeer::Endpoint("db".into());
        let dst = TracePeer::Ip("93.184.216.34".parse().unwrap());
        assert_eq!(
            t(&e, db.clone(), dst.clone(), 443, Protocol::Tcp).verdict,
            Verdict::Denied
        );
        let sels: Vec<_> = e.fqdn_selectors().into_iter().collect();
        let labels = e.fqdn_identity_labels(&sels, "93.184.216.34".parse().unwrap());
        let (id, _) = e.upsert_identity(labels);
        e.upsert_prefix("93.184.216.34/32".parse().unwrap(), id);
        let tr = t(&e, db.clone(), dst.clone(), 443, Protocol::Tcp);
        assert_eq!(tr.verdict, Verdict::Allowed);
        assert_eq!(tr.dst_identity, id);
        e.delete_prefix("93.184.216.34/32".parse().unwrap());
        e.release_identity(id);
        assert_eq!(t(&e, db, dst, 443, Protocol::Tcp).verdict, Verdict::Denied);
    }
}
