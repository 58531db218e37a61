//! `networking.k8s.io/v1` NetworkPolicy → one [`Rule`], following Kubernetes' API semantics
//! and Cilium's translation (pkg/k8s/network_policy.go).
//!
//! - `policyTypes` decides the enforced directions. Absent, it defaults as the API server does
//!   (pkg/apis/networking/v1/defaults.go): `Ingress`, plus `Egress` when `egress` has rules.
//!   Rules of a direction not listed are ignored (Kubernetes: the policy does not apply to
//!   that direction); they are still checked.
//! - A peer with only `podSelector` selects pods of the policy's namespace; `namespaceSelector`
//!   (optionally with `podSelector`) selects pods in the namespaces whose labels match, via
//!   Cilium's `io.cilium.k8s.namespace.labels.<key>` endpoint labels (an empty
//!   namespaceSelector: every namespace, `io.kubernetes.pod.namespace Exists`); `ipBlock` is a
//!   CIDR with exceptions. An empty or missing `from`/`to` means every peer.
//! - Ports: `protocol` TCP (default), UDP or SCTP; `port` a number 1-65535 or a name; `endPort`
//!   only with a numeric port. A missing `port` means every port of the protocol.

use crate::labels::{LabelKey, Operator, Requirement, NAMESPACE_LABELS_PREFIX, SOURCE_K8S};
use crate::model::{
    Direction, PeerRule, PeerSelector, Peers, PerDir, Port, PortProtocol, PortRule, Protocol, Rule,
    Subject,
};
use crate::yaml::{Decoder, Node, Path, Value};

use super::common::{
    cidr_with_except, is_svc_name, label_selector, namespace_requirement, normalize, KeyStyle,
};

pub(crate) fn spec(d: &mut Decoder, node: &Node, path: &Path, namespace: &str) -> Option<Rule> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let pod_selector = m
        .require(d, "podSelector")
        .and_then(|n| label_selector(d, n, &path.key("podSelector"), KeyStyle::Kubernetes));
    let types_node = m.take_some("policyTypes");
    let ingress_node = m.take("ingress");
    let egress_node = m.take("egress");
    m.finish(d);

    let mut rules = PerDir::<Vec<PeerRule>>::default();
    let mut has_rules = PerDir::<bool>::default();
    for (dir, node, key) in [
        (Direction::Ingress, ingress_node, "ingress"),
        (Direction::Egress, egress_node, "egress"),
    ] {
        let Some(node) = node else { continue };
        let p = path.key(key);
        let Some(items) = d.expect_seq(node, &p) else {
            continue;
        };
        *has_rules.get_mut(dir) = !items.is_empty();
        for (i, item) in items.iter().enumerate() {
            if let Some(r) = np_rule(d, item, &p.index(i), dir, namespace) {
                rules.get_mut(dir).push(r);
            }
        }
    }

    let mut types = PerDir::<bool>::default();
    match types_node {
        None => {
            types.ingress = true;
            types.egress = has_rules.egress;
        }
        Some(n) => {
            let p = path.key("policyTypes");
            if let Some(list) = d.expect_str_list(n, &p) {
                for (i, (s, span)) in list.into_iter().enumerate() {
                    let dir = match s {
                        "Ingress" => Direction::Ingress,
                        "Egress" => Direction::Egress,
                        other => {
                            d.error(
                                span,
                                &p.index(i),
                                format!(
                                    "unknown policy type {other:?}; expected Ingress or Egress"
                                ),
                            );
                            continue;
                        }
                    };
                    if *types.get(dir) {
                        d.error(span, &p.index(i), format!("policy type {s} listed twice"));
                    }
                    *types.get_mut(dir) = true;
                }
            }
        }
    }
    if d.error_count() > before {
        return None;
    }
    let mut subject = pod_selector?;
    subject.requirements.push(namespace_requirement(namespace));
    let subject = normalize(subject.requirements);
    let allow = PerDir {
        ingress: if types.ingress {
            rules.ingress
        } else {
            Vec::new()
        },
        egress: if types.egress {
            rules.egress
        } else {
            Vec::new()
        },
    };
    Some(Rule {
        subject: Subject::Endpoints(subject),
        allow,
        deny: PerDir::default(),
        default_deny: types,
        has_direction: types,
        requires: PerDir::default(),
        description: None,
        span: node.span,
    })
}

fn np_rule(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    dir: Direction,
    ns: &str,
) -> Option<PeerRule> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let peers_key = if dir == Direction::Ingress {
        "from"
    } else {
        "to"
    };
    let peers_node = m.take_some(peers_key);
    let ports_node = m.take_some("ports");
    m.finish(d);

    let mut selectors = Vec::new();
    let mut any_peer = false;
    if let Some(n) = peers_node {
        let p = path.key(peers_key);
        if let Some(items) = d.expect_seq(n, &p) {
            any_peer = !items.is_empty();
            for (i, item) in items.iter().enumerate() {
                if let Some(s) = np_peer(d, item, &p.index(i), ns) {
                    selectors.push(s);
                }
            }
        }
    }
    let mut ports = Vec::new();
    if let Some(n) = ports_node {
        let p = path.key("ports");
        if let Some(items) = d.expect_seq(n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(pp) = np_port(d, item, &p.index(i)) {
                    ports.push(pp);
                }
            }
        }
    }
    if d.error_count() > before {
        return None;
    }
    selectors.sort();
    selectors.dedup();
    Some(PeerRule {
        peers: if any_peer {
            Peers::Selectors(selectors)
        } else {
            Peers::All
        },
        ports: if ports.is_empty() {
            Vec::new()
        } else {
            vec![PortRule {
                ports,
                l7: None,
                server_names: Vec::new(),
            }]
        },
        icmps: Vec::new(),
        span: node.span,
    })
}

fn np_peer(d: &mut Decoder, node: &Node, path: &Path, ns: &str) -> Option<PeerSelector> {
    let mut m = d.expect_map(node, path)?;
    let pod = m.take_some("podSelector");
    let nss = m.take_some("namespaceSelector");
    let ip = m.take_some("ipBlock");
    m.finish(d);
    if let Some(ip) = ip {
        if pod.is_some() || nss.is_some() {
            d.error(
                ip.span,
                &path.key("ipBlock"),
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
            );
            return None;
        }
        let p = path.key("ipBlock");
        let mut im = d.expect_map(ip, &p)?;
        let cidr = im.require(d, "cidr");
        let except = im.take_some("except");
        im.finish(d);
        let c = cidr_with_except(d, cidr?, &p.key("cidr"), except, &p.key("except"))?;
        if let Some(e) = c.except.iter().find(|e| **e == c.cidr) {
            d.error(
                ip.span,
                &p.key("except"),
                format!("except {e} must be a strict subset of cidr {}", c.cidr),
            );
            return None;
        }
        return Some(PeerSelector::Cidr(c));
    }
    let pod_sel = match pod {
        Some(n) => Some(label_selector(
            d,
            n,
            &path.key("podSelector"),
            KeyStyle::Kubernetes,
        )?),
        None => None,
    };
    match nss {
        Some(n) => {
            let p = path.key("namespaceSelector");
            let ns_sel = label_selector(d, n, &p, KeyStyle::Kubernetes)?;
            let mut reqs = pod_sel.map(|s| s.requirements).unwrap_or_default();
            if ns_sel.requirements.is_empty() {
                reqs.push(Requirement {
                    key: LabelKey {
                        source: Some(SOURCE_K8S.into()),
                        key: crate::labels::NAMESPACE_LABEL.into(),
                    },
                    op: Operator::Exists,
                });
            }
            for r in ns_sel.requirements {
                reqs.push(Requirement {
                    key: LabelKey {
                        source: Some(SOURCE_K8S.into()),
                        key: format!("{NAMESPACE_LABELS_PREFIX}{}", r.key.key),
                    },
                    op: r.op,
                });
            }
            Some(PeerSelector::Endpoints(normalize(reqs)))
        }
        None => match pod_sel {
            Some(mut s) => {
                s.requirements.push(namespace_requirement(ns));
                Some(PeerSelector::Endpoints(normalize(s.requirements)))
            }
            None => {
                d.error(
                    node.span,
                    path,
                    "a peer needs podSelector, namespaceSelector or ipBlock",
                );
                None
            }
        },
    }
}

fn np_port(d: &mut Decoder, node: &Node, path: &Path) -> Option<PortProtocol> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let proto_n = m.take_some("protocol");
    let port_n = m.take_some("port");
    let end_n = m.take_some("endPort");
    m.finish(d);
    let protocol = match proto_n {
        None => Protocol::Tcp,
        Some(n) => {
            let p = path.key("protocol");
            match d.expect_str(n, &p)? {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => {
                    d.error(
                        n.span,
                        &p,
                        format!("unsupported protocol {other:?}; expected TCP, UDP or SCTP"),
                    );
                    return None;
                }
            }
        }
    };
    let port = match port_n {
        None => Port::Any,
        Some(n) => {
            let p = path.key("port");
            match &n.value {
                Value::Int(i) if (1..=65535).contains(i) => Port::Number(*i as u16),
                Value::Int(i) => {
                    d.error(n.span, &p, format!("port {i} is out of range 1-65535"));
                    return None;
                }
                Value::Str(s) if is_svc_name(s) && s.chars().all(|c| !c.is_ascii_uppercase()) => {
                    Port::Named(s.clone())
                }
                Value::Str(s) => {
                    d.error(
                        n.span,
                        &p,
                        format!("invalid port {s:?}: a number 1-65535 (unquoted) or a port name (IANA service name: up to 15 lower-case letters, digits and '-')"),
                    );
                    return None;
                }
                other => {
                    d.error(
                        n.span,
                        &p,
                        format!(
                            "expected a port number or name, found {}",
                            other.type_name()
                        ),
                    );
                    return None;
                }
            }
        }
    };
    let mut end_port = None;
    if let Some(n) = end_n {
        let p = path.key("endPort");
        let end = d.expect_int_in(n, &p, 1, 65535)? as u16;
        match &port {
            Port::Number(start) if end > *start => end_port = Some(end),
            Port::Number(start) if end == *start => {}
            Port::Number(start) => {
                d.error(n.span, &p, format!("endPort {end} is below port {start}"))
            }
            _ => d.error(
                n.span,
                &p,
                "endPort needs a numeric port to start the range",
            ),
        }
    }
    if d.error_count() > before {
        return None;
    }
    Some(PortProtocol {
        port,
        end_port,
        protocol,
    })
}
