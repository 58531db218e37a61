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
                e.rules.clone(),
                e.proxy_port,
                e.l7,
            )
        }
        (LookupVerdict::Deny, Some(e)) => (
            drop_verdict,
            "denied by a deny rule".to_string(),
            e.rules.clone(),
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
