//! `policy trace` selectors: `endpoint:NAME`, `labels:K=V[,K=V...]`, `ip:ADDR`,
//! `entity:NAME`, and the `--dport PORT[/PROTO]` argument.

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy::labels::{Label, LabelKey, LabelSet, NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL};
use policy::model::{Entity, Protocol};
use policy::trace::TracePeer;

use crate::config::{workload_labels, Config};

/// A parsed selector, before it is resolved against a configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerSel {
    Endpoint(String),
    /// `(source, key, value)`; source `None` means the Kubernetes label of a workload.
    Labels(Vec<(Option<String>, String, String)>),
    Ip(IpAddr),
    Entity(Entity),
}

pub fn parse(s: &str) -> Result<PeerSel, String> {
    let Some((kind, rest)) = s.split_once(':') else {
        return Err(format!(
            "invalid selector {s:?}: use endpoint:NAME, labels:K=V[,K=V...], ip:ADDR or entity:NAME"
        ));
    };
    match kind {
        "endpoint" if !rest.is_empty() => Ok(PeerSel::Endpoint(rest.to_string())),
        "ip" => rest
            .parse()
            .map(PeerSel::Ip)
            .map_err(|_| format!("invalid IP address {rest:?} in {s:?}")),
        "entity" => match Entity::parse(rest) {
            Some(Entity::All) | None => Err(format!(
                "unknown entity {rest:?}: use world, world-ipv4, world-ipv6, host, remote-node, \
                 kube-apiserver, ingress, init, health, unmanaged or cluster"
            )),
            Some(e) => Ok(PeerSel::Entity(e)),
        },
        "labels" => {
            let mut out = Vec::new();
            for kv in rest.split(',') {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                if k.is_empty() {
                    return Err(format!("invalid label {kv:?} in {s:?}: write K=V"));
                }
                let key = LabelKey::parse(k);
                out.push((key.source, key.key, v.to_string()));
            }
            Ok(PeerSel::Labels(out))
        }
        _ => Err(format!(
            "invalid selector {s:?}: use endpoint:NAME, labels:K=V[,K=V...], ip:ADDR or entity:NAME"
        )),
    }
}

impl PeerSel {
    /// The engine's peer. `labels:` becomes a hypothetical workload with the labels a pod of
    /// that namespace would carry (namespace `default` unless given), so that namespaced
    /// policies select it as they would a real one.
    pub fn to_trace_peer(&self, cfg: &Config) -> TracePeer {
        match self {
            PeerSel::Endpoint(n) => TracePeer::Endpoint(n.clone()),
            PeerSel::Ip(ip) => TracePeer::Ip(*ip),
            PeerSel::Entity(e) => TracePeer::Entity(*e),
            PeerSel::Labels(ls) => {
                let mut k8s = BTreeMap::new();
                let mut other = Vec::new();
                let mut namespace = "default".to_string();
                let mut service_account = None;
                for (source, key, value) in ls {
                    match source.as_deref() {
                        None | Some("k8s") if key == NAMESPACE_LABEL => namespace = value.clone(),
                        None | Some("k8s") if key == SERVICE_ACCOUNT_LABEL => {
                            service_account = Some(value.clone())
                        }
                        None | Some("k8s") => {
                            k8s.insert(key.clone(), value.clone());
                        }
                        Some(src) => other.push(Label::new(src, key, value)),
                    }
                }
                let base = workload_labels(
                    &namespace,
                    &k8s,
                    cfg.namespaces.get(&namespace),
                    service_account.as_deref(),
                );
                let mut all: Vec<Label> = base.labels().to_vec();
                all.extend(other);
                TracePeer::Labels(LabelSet::new(all))
            }
        }
    }
}

/// `443`, `443/TCP`, `53/udp`; TCP when no protocol is given.
pub fn parse_dport(s: &str) -> Result<(u16, Protocol), String> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (
            p,
            Protocol::parse(proto).ok_or_else(|| {
                format!("unknown protocol {proto:?}: use TCP, UDP, SCTP, ICMP, ICMPv6 or ANY")
            })?,
        ),
        None => (s, Protocol::Tcp),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid port {port:?}: a number from 0 to 65535"))?;
    Ok((port, proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(parse("endpoint:web"), Ok(PeerSel::Endpoint("web".into())));
        assert_eq!(
            parse("ip:10.0.0.1"),
            Ok(PeerSel::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(parse("entity:world"), Ok(PeerSel::Entity(Entity::World)));
        assert_eq!(
            parse("labels:app=web,k8s:tier=db"),
            Ok(PeerSel::Labels(vec![
                (None, "app".into(), "web".into()),
                (Some("k8s".into()), "tier".into(), "db".into())
            ]))
        );
        assert!(parse("ip:nope").is_err());
        assert!(parse("entity:all").is_err());
        assert!(parse("web").is_err());
        assert!(parse("pod:web").is_err());
    }

    #[test]
    fn dports() {
        assert_eq!(parse_dport("443"), Ok((443, Protocol::Tcp)));
        assert_eq!(parse_dport("53/udp"), Ok((53, Protocol::Udp)));
        assert!(parse_dport("70000").is_err());
        assert!(parse_dport("53/xyz").is_err());
    }
}
