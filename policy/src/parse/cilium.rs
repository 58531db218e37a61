//! Cilium rules (`spec`, `specs[]`, and the elements of a plain rule list) → [`Rule`].
//!
//! Field sets and checks follow Cilium's `pkg/policy/api` (rule.go, ingress.go, egress.go,
//! l4.go, rule_validation.go, fqdn.go, icmp.go, http.go, kafka/kafka.go); where Cilium only
//! finds a problem at runtime (a regex that does not compile) the check is made here.

use regex::Regex;

use crate::error::Span;
use crate::fqdn::{DnsName, FqdnPattern};
use crate::labels::{LabelKey, LabelSelector, Operator, Requirement, SOURCE_RESERVED};
use crate::model::{CidrSelector, PolicyKind};
use crate::model::{
    Direction, DnsRule, Entity, FqdnSelector, HeaderMatch, HeaderRule, HttpRule, IcmpField,
    IpFamily, KafkaRole, KafkaRule, L7Rules, MismatchAction, PeerRule, PeerSelector, Peers, PerDir,
    Port, PortProtocol, PortRule, Protocol, Requires, Rule, SecretRef, Subject,
};
use crate::yaml::{Decoder, Node, Path};

use super::common::{
    cidr_or_addr, cidr_with_except, is_svc_name, label_selector, names_namespace,
    namespace_requirement, normalize, scope_peer, selects_init, KeyStyle, Scope,
};

/// Cilium's limits on `toPorts[].ports` and `icmps[].fields` (rule_validation.go).
const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

/// Reads one Cilium rule.
///
/// Default deny (`Rule::default_deny`): a direction is enforced by a rule that *has a
/// section* for it: `ingress`/`ingressDeny` (resp. `egress`/`egressDeny`) present in the
/// rule, whatever its value, unless `enableDefaultDeny` switches it off. Evidence and choice:
/// - Cilium's documentation (policy/language.rst, "Ingress/Egress Default Deny"): "An
///   endpoint can be put into the default deny mode at ingress or egress if a rule selects
///   the endpoint and contains the respective rule section ingress or egress", illustrated by
///   examples/policies/l3/egress-default-deny (`egress:` with no value in YAML, `"egress": []`
///   in JSON), which is meant to deny all egress.
/// - Cilium's code only counts non-empty sections (`Rule.Sanitize`:
///   `len(r.Egress) > 0 || len(r.EgressDeny) > 0`; newer `Rule.Validate` even rejects a rule
///   whose sections are all empty), so that example stopped doing what its documentation says;
///   upstream now writes it `egress: [{}]`. Its own NetworkPolicy translation
///   (pkg/k8s/network_policy.go) produces `[{}]` for exactly this reason.
///
/// fqdnwall follows the documented intent, which fails closed: an empty or null section
/// enforces its direction and allows nothing. `egress: [{}]` does the same (a `{}` element
/// names no peer and no port, so it selects nothing: `Peers::Selectors(vec![])`).
/// A rule with no section at all is an error, as in Cilium's `Rule.Validate`.
pub(crate) fn rule(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    scope: &Scope,
    allow_node_selector: bool,
) -> Option<Rule> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let es = m.take_some("endpointSelector");
    let ns = m.take_some("nodeSelector");
    let subject = match (es, ns) {
        (Some(_), Some(_)) => {
            m.error_at(
                d,
                "nodeSelector",
                "a rule has either endpointSelector or nodeSelector, not both",
            );
            None
        }
        (None, None) => {
            d.error(
                m.span(),
                path,
                "missing field `endpointSelector` (or `nodeSelector`): every rule selects the endpoints it applies to",
            );
            None
        }
        (Some(es), None) => {
            let p = path.key("endpointSelector");
            label_selector(d, es, &p, KeyStyle::Cilium)
                .and_then(|sel| subject_selector(d, sel, es.span, &p, scope))
                .map(Subject::Endpoints)
        }
        (None, Some(ns)) => {
            let p = path.key("nodeSelector");
            if !allow_node_selector {
                d.error(
                    m.key_span("nodeSelector").unwrap_or(ns.span),
                    &p,
                    "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy (or a plain rule list)",
                );
                None
            } else {
                label_selector(d, ns, &p, KeyStyle::Cilium).map(Subject::Nodes)
            }
        }
    };
    let host_policy = matches!(subject, Some(Subject::Nodes(_))) || (es.is_none() && ns.is_some());
    let init = match &subject {
        Some(Subject::Endpoints(s)) => selects_init(s),
        _ => false,
    };
    let ctx = RuleCtx {
        scope,
        host_policy,
        subject_selects_init: init,
    };

    let mut allow = PerDir::<Vec<PeerRule>>::default();
    let mut deny = PerDir::<Vec<PeerRule>>::default();
    let mut has_direction = PerDir::<bool>::default();
    let mut requires = PerDir::<Requires>::default();
    for (dir, allow_key, deny_key) in [
        (Direction::Ingress, "ingress", "ingressDeny"),
        (Direction::Egress, "egress", "egressDeny"),
    ] {
        for (key, is_deny) in [(allow_key, false), (deny_key, true)] {
            let Some(section) = m.take(key) else { continue };
            *has_direction.get_mut(dir) = true;
            let spath = path.key(key);
            let Some(items) = d.expect_seq(section, &spath) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let req = requires.get_mut(dir);
                let req = if is_deny {
                    &mut req.deny
                } else {
                    &mut req.allow
                };
                if let Some(pr) = peer_rule(d, item, &spath.index(i), dir, is_deny, &ctx, req) {
                    if is_deny {
                        deny.get_mut(dir).push(pr);
                    } else {
                        allow.get_mut(dir).push(pr);
                    }
                }
            }
        }
    }
    if !has_direction.ingress && !has_direction.egress {
        d.error(
            m.span(),
            path,
            "rule must have at least one of ingress, ingressDeny, egress, egressDeny",
        );
    }

    if let Some(l) = m.take_some("labels") {
        rule_labels(d, l, &path.key("labels"));
    }
    let description = m
        .take_some("description")
        .and_then(|n| d.expect_str(n, &path.key("description")))
        .map(str::to_string);
    let mut default_deny = has_direction;
    if let Some(edd) = m.take_some("enableDefaultDeny") {
        let epath = path.key("enableDefaultDeny");
        if let Some(mut em) = d.expect_map(edd, &epath) {
            for (dir, key) in [
                (Direction::Ingress, "ingress"),
                (Direction::Egress, "egress"),
            ] {
                if let Some(v) = em.take_some(key) {
                    if let Some(b) = d.expect_bool(v, &epath.key(key)) {
                        // `true` without a section for the direction has nothing to enforce
                        // (Cilium creates no policy entry for it either).
                        *default_deny.get_mut(dir) = b && *has_direction.get(dir);
                    }
                }
            }
            em.finish(d);
        }
    }
    m.finish_with(d, |name| match name {
        "log" => Some("`log` (policy verdict log annotations) is not supported yet".into()),
        _ => None,
    });
    if d.error_count() > before {
        return None;
    }
    Some(Rule {
        subject: subject?,
        allow,
        deny,
        default_deny,
        has_direction,
        requires,
        description,
        span: node.span,
    })
}

/// The subject selector of a namespaced policy only ever selects endpoints of the policy's
/// namespace (Cilium's `ParseToCiliumRule` adds the namespace match and drops a different one
/// with a warning; fqdnwall reports the contradiction instead of silently changing it).
fn subject_selector(
    d: &mut Decoder,
    mut sel: LabelSelector,
    span: Span,
    path: &Path,
    scope: &Scope,
) -> Option<LabelSelector> {
    let Some(ns) = &scope.namespace else {
        return Some(sel);
    };
    if names_namespace(&sel) {
        let own = namespace_requirement(ns);
        let contradicts = sel.requirements.iter().any(|r| {
            r.key.key == own.key.key
                && !matches!(&r.op, Operator::In(vs) if vs.iter().any(|v| v == ns))
        });
        if contradicts {
            d.error(
                span,
                path,
                format!(
                    "the endpointSelector of a policy in namespace {ns:?} only selects endpoints \
                     of that namespace; it cannot select {} (use a CiliumClusterwideNetworkPolicy)",
                    crate::labels::NAMESPACE_LABEL
                ),
            );
            return None;
        }
    }
    sel.requirements.push(namespace_requirement(ns));
    Some(normalize(sel.requirements))
}

/// Rule labels: Cilium `LabelArray`, each `"source:key=value"` or `{key, value, source}`.
/// Checked and otherwise metadata only.
fn rule_labels(d: &mut Decoder, node: &Node, path: &Path) {
    let Some(items) = d.expect_seq(node, path) else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let p = path.index(i);
        if item.as_str().is_some() {
            d.expect_nonempty_str(item, &p);
            continue;
        }
        let Some(mut m) = d.expect_map(item, &p) else {
            continue;
        };
        if let Some(k) = m.require(d, "key") {
            d.expect_nonempty_str(k, &p.key("key"));
        }
        for f in ["value", "source"] {
            if let Some(v) = m.take_some(f) {
                d.expect_str(v, &p.key(f));
            }
        }
        m.finish(d);
    }
}

struct RuleCtx<'a> {
    scope: &'a Scope,
    host_policy: bool,
    subject_selects_init: bool,
}

/// The L3 members of a peer rule, in Cilium's names.
const INGRESS_L3: &[&str] = &[
    "fromEndpoints",
    "fromCIDR",
    "fromCIDRSet",
    "fromEntities",
    "fromNodes",
    "fromGroups",
];
const EGRESS_L3: &[&str] = &[
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "toNodes",
    "toGroups",
    "toServices",
    "toFQDNs",
];

fn peer_rule(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    dir: Direction,
    deny: bool,
    ctx: &RuleCtx,
    requires: &mut Vec<LabelSelector>,
) -> Option<PeerRule> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let (l3_names, prefix) = match dir {
        Direction::Ingress => (INGRESS_L3, "from"),
        Direction::Egress => (EGRESS_L3, "to"),
    };
    // Cilium (IngressCommonRule/EgressCommonRule.Validate) rejects a rule combining two
    // different kinds of L3 peer ("combining FromEndpoints and FromCIDR is not supported
    // yet"); toFQDNs is one of the kinds, so it cannot be mixed with other peers either.
    let mut members: Vec<&'static str> = Vec::new();
    for name in l3_names {
        if deny && *name == "toFQDNs" {
            continue;
        }
        if let Some(n) = m.take_some(name) {
            if n.as_seq().is_some_and(|s| !s.is_empty()) {
                // CIDR and CIDRSet are one kind of peer (Cilium's documentation: "Overlaps
                // are allowed between ToCIDR and ToCIDRSet", and its cidr example combines
                // them), so they may appear together.
                let same_kind =
                    |a: &str, b: &str| a.trim_end_matches("Set") == b.trim_end_matches("Set");
                if let Some(first) = members.iter().find(|f| !same_kind(f, name)) {
                    m.error_at(
                        d,
                        name,
                        format!(
                            "{name} cannot be combined with {first} in one rule (Cilium rejects \
                             it too); write them as separate rules"
                        ),
                    );
                }
                members.push(name);
            }
        }
    }

    let mut selectors: Vec<PeerSelector> = Vec::new();
    let mut named_l3 = false;
    let mut all = false;
    let mut fqdns: Option<Vec<FqdnSelector>> = None;

    let k = |suffix: &str| -> &'static str {
        match (prefix, suffix) {
            ("from", "Endpoints") => "fromEndpoints",
            ("from", "Requires") => "fromRequires",
            ("from", "CIDR") => "fromCIDR",
            ("from", "CIDRSet") => "fromCIDRSet",
            ("from", "Entities") => "fromEntities",
            ("from", "Nodes") => "fromNodes",
            ("from", "Groups") => "fromGroups",
            ("to", "Endpoints") => "toEndpoints",
            ("to", "Requires") => "toRequires",
            ("to", "CIDR") => "toCIDR",
            ("to", "CIDRSet") => "toCIDRSet",
            ("to", "Entities") => "toEntities",
            ("to", "Nodes") => "toNodes",
            ("to", "Groups") => "toGroups",
            _ => "",
        }
    };

    // Endpoints.
    let key = k("Endpoints");
    if let Some(n) = m.take_some(key) {
        named_l3 = true;
        let p = path.key(key);
        if let Some(items) = d.expect_seq(n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(sel) = label_selector(d, item, &p.index(i), KeyStyle::Cilium) {
                    let sel = scope_peer(sel, ctx.scope, ctx.subject_selects_init, false);
                    selectors.push(PeerSelector::Endpoints(sel));
                }
            }
        }
    }
    // Requires: a constraint on the endpoint peers of every rule selecting the same
    // endpoint (model::Requires). Not an L3 peer of this rule: alone it selects nothing.
    // Scoped like a peer selector, but even when it names reserved labels (Cilium's
    // getEndpointSelector with addK8sPrefix = false).
    let key = k("Requires");
    let mut own_requires = Vec::new();
    if let Some(n) = m.take_some(key) {
        let p = path.key(key);
        if let Some(items) = d.expect_seq(n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(sel) = label_selector(d, item, &p.index(i), KeyStyle::Cilium) {
                    own_requires.push(scope_peer(sel, ctx.scope, ctx.subject_selects_init, true));
                }
            }
        }
    }
    // CIDR.
    let key = k("CIDR");
    if let Some(n) = m.take_some(key) {
        named_l3 = true;
        let p = path.key(key);
        if let Some(list) = d.expect_str_list(n, &p) {
            for (i, (s, span)) in list.into_iter().enumerate() {
                match cidr_or_addr(s) {
                    Ok(cidr) => selectors.push(PeerSelector::Cidr(CidrSelector {
                        cidr,
                        except: Vec::new(),
                    })),
                    Err(e) => d.error(span, &p.index(i), e),
                }
            }
        }
    }
    // CIDRSet.
    let key = k("CIDRSet");
    if let Some(n) = m.take_some(key) {
        named_l3 = true;
        let p = path.key(key);
        if let Some(items) = d.expect_seq(n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(c) = cidr_rule(d, item, &p.index(i)) {
                    selectors.push(PeerSelector::Cidr(c));
                }
            }
        }
    }
    // Entities.
    let key = k("Entities");
    if let Some(n) = m.take_some(key) {
        named_l3 = true;
        let p = path.key(key);
        if let Some(list) = d.expect_str_list(n, &p) {
            for (i, (s, span)) in list.into_iter().enumerate() {
                match Entity::parse(s) {
                    Some(Entity::All) => all = true,
                    Some(e) => selectors.push(PeerSelector::Entity(e)),
                    None => d.error(
                        span,
                        &p.index(i),
                        format!(
                            "unknown entity {s:?}; expected one of: all, world, world-ipv4, \
                             world-ipv6, cluster, host, remote-node, kube-apiserver, ingress, \
                             init, health, unmanaged"
                        ),
                    ),
                }
            }
        }
    }
    // Nodes: fqdnwall guards one node, so a node selector selects the host endpoint when the
    // host's labels match it (and nothing else: there are no remote nodes).
    let key = k("Nodes");
    if let Some(n) = m.take_some(key) {
        named_l3 = true;
        let p = path.key(key);
        if let Some(items) = d.expect_seq(n, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(mut sel) = label_selector(d, item, &p.index(i), KeyStyle::Cilium) {
                    sel.requirements.push(Requirement {
                        key: LabelKey {
                            source: Some(SOURCE_RESERVED.to_string()),
                            key: "host".into(),
                        },
                        op: Operator::Exists,
                    });
                    selectors.push(PeerSelector::Endpoints(normalize(sel.requirements)));
                }
            }
        }
    }
    // Groups: cloud provider integrations.
    let key = k("Groups");
    if m.take_some(key).is_some() {
        m.error_at(
            d,
            key,
            format!("{key} (cloud provider security groups) is not supported yet"),
        );
    }
    if dir == Direction::Egress {
        if let Some(n) = m.take_some("toServices") {
            named_l3 = true;
            to_services(d, n, &path.key("toServices"));
        }
        if !deny {
            if let Some(n) = m.take_some("toFQDNs") {
                named_l3 = true;
                fqdns = Some(fqdn_selectors(d, n, &path.key("toFQDNs")));
            }
        }
    }

    // L4.
    let mut ports = Vec::new();
    let mut has_to_ports = false;
    if let Some(n) = m.take_some("toPorts") {
        let p = path.key("toPorts");
        if let Some(items) = d.expect_seq(n, &p) {
            has_to_ports = !items.is_empty();
            for (i, item) in items.iter().enumerate() {
                if let Some(pr) = port_rule(d, item, &p.index(i), dir, deny, ctx) {
                    ports.push(pr);
                }
            }
        }
    }
    let mut icmps = Vec::new();
    let mut has_icmps = false;
    if let Some(n) = m.take_some("icmps") {
        let p = path.key("icmps");
        if let Some(items) = d.expect_seq(n, &p) {
            has_icmps = !items.is_empty();
            if has_to_ports && !items.is_empty() {
                m.error_at(
                    d,
                    "icmps",
                    "icmps cannot be combined with toPorts in one rule (as in Cilium); \
                     write a separate rule for the ICMP types",
                );
            }
            for (i, item) in items.iter().enumerate() {
                icmp_rule(d, item, &p.index(i), &mut icmps);
            }
        }
    }
    if !deny {
        if let Some(n) = m.take_some("authentication") {
            authentication(d, n, &path.key("authentication"));
        }
    }
    let deny_kind = if dir == Direction::Ingress {
        "ingressDeny"
    } else {
        "egressDeny"
    };
    m.finish_with(d, |name| match name {
        "toFQDNs" if deny => Some(format!("toFQDNs is not allowed in {deny_kind} rules")),
        "toFQDNs" | "toServices" if dir == Direction::Ingress => {
            Some(format!("{name} is only allowed in egress rules"))
        }
        "authentication" if deny => Some(format!(
            "authentication is not allowed in {deny_kind} rules"
        )),
        "auth" => {
            Some("`auth` (mutual authentication, now `authentication`) is not supported yet".into())
        }
        n if n.starts_with("from") && dir == Direction::Egress => Some(format!(
            "{n} is an ingress field; egress rules use to* fields"
        )),
        n if n.starts_with("to") && n != "toPorts" && dir == Direction::Ingress => Some(format!(
            "{n} is an egress field; ingress rules use from* fields"
        )),
        _ => None,
    });
    if d.error_count() > before {
        return None;
    }
    requires.extend(own_requires);

    // Peers: see model::PeerRule. A rule naming an L3 member (even with an empty list) selects
    // exactly what it lists (an empty list selects nothing: Cilium's mergeEndpointSelectors);
    // a rule naming only ports (or ICMP types) applies to every peer; a rule naming nothing
    // (`{}`) selects nothing but still counts for default deny.
    // A toPorts entry with neither ports nor L7 rules allows nothing (Cilium's mergeIngress /
    // mergeEgress iterate its empty port list); it must not read as "every port". When every
    // entry is like that, the whole rule allows nothing.
    let all_ports_empty = (has_to_ports
        && ports.iter().all(|p| p.ports.is_empty() && p.l7.is_none()))
        || (has_icmps && icmps.is_empty());
    ports.retain(|p| !p.ports.is_empty() || p.l7.is_some());
    let peers = if all_ports_empty {
        Peers::Selectors(Vec::new())
    } else if let Some(f) = fqdns {
        if f.is_empty() {
            Peers::Selectors(Vec::new())
        } else {
            Peers::Fqdns(f)
        }
    } else if all {
        Peers::All
    } else if named_l3 {
        selectors.sort();
        selectors.dedup();
        Peers::Selectors(selectors)
    } else if !ports.is_empty() || !icmps.is_empty() {
        Peers::All
    } else {
        Peers::Selectors(Vec::new())
    };
    Some(PeerRule {
        peers,
        ports,
        icmps,
        span: node.span,
    })
}

fn cidr_rule(d: &mut Decoder, node: &Node, path: &Path) -> Option<CidrSelector> {
    let mut m = d.expect_map(node, path)?;
    for unsupported in ["cidrGroupRef", "cidrGroupSelector"] {
        if m.take_some(unsupported).is_some() {
            m.error_at(
                d,
                unsupported,
                format!("{unsupported} (CiliumCIDRGroup) is not supported yet; list the CIDRs"),
            );
        }
    }
    let cidr = m.take_some("cidr");
    let except = m.take_some("except");
    let had_group = m.has("cidrGroupRef") || m.has("cidrGroupSelector");
    m.finish(d);
    let Some(cidr) = cidr else {
        if !had_group {
            d.error(node.span, path, "missing field `cidr`");
        }
        return None;
    };
    if had_group {
        return None;
    }
    cidr_with_except(d, cidr, &path.key("cidr"), except, &path.key("except"))
}

fn to_services(d: &mut Decoder, node: &Node, path: &Path) {
    let Some(items) = d.expect_seq(node, path) else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let p = path.index(i);
        let Some(mut m) = d.expect_map(item, &p) else {
            continue;
        };
        for sel in ["k8sService", "k8sServiceSelector"] {
            if m.take_some(sel).is_some() {
                m.error_at(
                    d,
                    sel,
                    "toServices (selecting Kubernetes service backends) is not supported yet",
                );
            }
        }
        // An entry naming no service selects nothing (Cilium's Service with neither
        // selector matches no service), so it is accepted as such.
        m.finish(d);
    }
}

fn authentication(d: &mut Decoder, node: &Node, path: &Path) {
    let Some(mut m) = d.expect_map(node, path) else {
        return;
    };
    if let Some(mode) = m.require(d, "mode") {
        let mp = path.key("mode");
        match d.expect_str(mode, &mp) {
            // `disabled` is the same as no authentication requirement.
            Some("disabled") => {}
            Some("required") | Some("test-always-fail") => d.error(
                mode.span,
                &mp,
                "authentication (mutual authentication) is not supported yet",
            ),
            Some(other) => d.error(
                mode.span,
                &mp,
                format!("unknown authentication mode {other:?}; expected disabled, required or test-always-fail"),
            ),
            None => {}
        }
    }
    m.finish(d);
}

/// `toFQDNs` entries and DNS rules share the same shape: exactly one of matchName/matchPattern.
enum NameOrPattern {
    Name(DnsName),
    Pattern(FqdnPattern),
}

fn name_or_pattern(d: &mut Decoder, node: &Node, path: &Path) -> Option<NameOrPattern> {
    let mut m = d.expect_map(node, path)?;
    let name = m.take_some("matchName");
    let pattern = m.take_some("matchPattern");
    m.finish(d);
    match (name, pattern) {
        (Some(_), Some(p)) => {
            d.error(
                p.span,
                &path.key("matchPattern"),
                "only one of matchName and matchPattern may be given per entry",
            );
            None
        }
        (None, None) => {
            d.error(
                node.span,
                path,
                "one of matchName or matchPattern is required",
            );
            None
        }
        (Some(n), None) => {
            let p = path.key("matchName");
            let s = d.expect_str(n, &p)?;
            match DnsName::parse_match_name(s) {
                Ok(name) => Some(NameOrPattern::Name(name)),
                Err(e) => {
                    d.error(n.span, &p, e);
                    None
                }
            }
        }
        (None, Some(pt)) => {
            let p = path.key("matchPattern");
            let s = d.expect_str(pt, &p)?;
            match FqdnPattern::parse(s) {
                Ok(pat) => Some(NameOrPattern::Pattern(pat)),
                Err(e) => {
                    d.error(pt.span, &p, e);
                    None
                }
            }
        }
    }
}

fn fqdn_selectors(d: &mut Decoder, node: &Node, path: &Path) -> Vec<FqdnSelector> {
    let mut out = Vec::new();
    if let Some(items) = d.expect_seq(node, path) {
        for (i, item) in items.iter().enumerate() {
            match name_or_pattern(d, item, &path.index(i)) {
                Some(NameOrPattern::Name(n)) => out.push(FqdnSelector::MatchName(n)),
                Some(NameOrPattern::Pattern(p)) => out.push(FqdnSelector::MatchPattern(p)),
                None => {}
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn port_rule(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    dir: Direction,
    deny: bool,
    ctx: &RuleCtx,
) -> Option<PortRule> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let mut ports: Vec<(PortProtocol, Span, Path)> = Vec::new();
    if let Some(n) = m.take_some("ports") {
        let p = path.key("ports");
        if let Some(items) = d.expect_seq(n, &p) {
            if items.len() > MAX_PORTS {
                d.error(
                    n.span,
                    &p,
                    format!("too many ports ({}), at most {MAX_PORTS}", items.len()),
                );
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(pp) = port_protocol(d, item, &p.index(i)) {
                    ports.push((pp, item.span, p.index(i)));
                }
            }
        }
    }
    let mut l7 = None;
    let mut server_names = Vec::new();
    if !deny {
        if let Some(n) = m.take_some("rules") {
            l7 = l7_rules(d, n, &path.key("rules"), dir, ctx, &ports);
        }
        if let Some(n) = m.take_some("serverNames") {
            let p = path.key("serverNames");
            if let Some(list) = d.expect_str_list(n, &p) {
                for (i, (s, span)) in list.into_iter().enumerate() {
                    if s.is_empty() {
                        d.error(span, &p.index(i), "empty server name is not allowed");
                    } else {
                        server_names.push(s.to_string());
                    }
                }
            }
            if l7.as_ref().is_some_and(|r| !matches!(r, L7Rules::Dns(_)))
                && !server_names.is_empty()
            {
                m.error_at(
                    d,
                    "serverNames",
                    "serverNames are not allowed with L7 rules without TLS termination (as in Cilium)",
                );
            }
        }
        if m.take_some("listener").is_some() {
            m.error_at(
                d,
                "listener",
                "listener (redirect to a custom Envoy listener) is not supported yet",
            );
        }
        for tls in ["terminatingTLS", "originatingTLS"] {
            if m.take_some(tls).is_some() {
                m.error_at(
                    d,
                    tls,
                    format!("{tls} (TLS interception by the L7 proxy) is not supported yet"),
                );
            }
        }
    }
    let deny_kind = if dir == Direction::Ingress {
        "ingressDeny"
    } else {
        "egressDeny"
    };
    m.finish_with(d, |name| match name {
        "rules" | "serverNames" | "listener" | "terminatingTLS" | "originatingTLS" if deny => Some(
            format!("{name} is not allowed in {deny_kind} rules: deny rules have no L7 part"),
        ),
        _ => None,
    });
    if d.error_count() > before {
        return None;
    }
    Some(PortRule {
        ports: ports.into_iter().map(|(p, _, _)| p).collect(),
        l7,
        server_names,
    })
}

/// One `ports[]` element: `port` (number or name; string or integer), `endPort`, `protocol`.
fn port_protocol(d: &mut Decoder, node: &Node, path: &Path) -> Option<PortProtocol> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let port_node = m.take_some("port");
    let end_node = m.take_some("endPort");
    let proto_node = m.take_some("protocol");
    m.finish(d);

    let port = match port_node {
        None => Port::Any,
        Some(n) => parse_port(d, n, &path.key("port"))?,
    };
    let protocol = match proto_node {
        None => Protocol::Any,
        Some(n) => cilium_protocol(d, n, &path.key("protocol"))?,
    };
    let mut end_port = None;
    if let Some(n) = end_node {
        let p = path.key("endPort");
        let end = d.expect_int_in(n, &p, 0, 65535)? as u16;
        match &port {
            Port::Number(start) if end > *start => end_port = Some(end),
            Port::Number(start) if end == *start => {}
            Port::Number(start) => {
                d.error(n.span, &p, format!("endPort {end} is below port {start}"))
            }
            Port::Any => d.error(
                n.span,
                &p,
                "endPort needs a non-zero numeric port to start the range",
            ),
            Port::Named(name) => d.error(
                n.span,
                &p,
                format!("endPort cannot be used with the named port {name:?}"),
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

/// A port as Cilium reads it: an IANA service name is a named port (lower-cased); otherwise a
/// number 0–65535 (0 = every port). Cilium parses numbers with Go's base prefixes, so `010`
/// would silently be port 8; fqdnwall rejects leading zeros instead.
pub(crate) fn parse_port(d: &mut Decoder, node: &Node, path: &Path) -> Option<Port> {
    let n = match &node.value {
        crate::yaml::Value::Int(i) => *i,
        crate::yaml::Value::Str(s) => {
            if is_svc_name(s) {
                return Some(Port::Named(s.to_ascii_lowercase()));
            }
            if s.is_empty() {
                return Some(Port::Any);
            }
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                d.error(
                    node.span,
                    path,
                    format!("invalid port {s:?}: expected a number 0-65535 or a port name (IANA service name: up to 15 letters, digits and '-', at least one letter)"),
                );
                return None;
            }
            if s.len() > 1 && s.starts_with('0') {
                d.error(node.span, path, format!("invalid port {s:?}: leading zeros are ambiguous (Cilium would read it as octal)"));
                return None;
            }
            s.parse::<i64>().unwrap_or(i64::MAX)
        }
        _ => {
            d.error(
                node.span,
                path,
                format!(
                    "expected a port number or name, found {}",
                    node.value.type_name()
                ),
            );
            return None;
        }
    };
    if !(0..=65535).contains(&n) {
        d.error(node.span, path, format!("port {n} is out of range 0-65535"));
        return None;
    }
    Some(if n == 0 {
        Port::Any
    } else {
        Port::Number(n as u16)
    })
}

fn cilium_protocol(d: &mut Decoder, node: &Node, path: &Path) -> Option<Protocol> {
    let s = d.expect_str(node, path)?;
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        "ANY" | "" => Some(Protocol::Any),
        "ICMP" | "ICMPV6" => {
            d.error(
                node.span,
                path,
                format!("protocol {s} is not a port protocol; allow ICMP types with `icmps: [{{fields: [{{type: ..., family: IPv4|IPv6}}]}}]`"),
            );
            None
        }
        "VRRP" | "IGMP" | "GRE" | "IPIP" | "IPV6" | "ESP" | "AH" => {
            d.error(
                node.span,
                path,
                format!("protocol {s} (extended IP protocols) is not supported yet; expected TCP, UDP, SCTP or ANY"),
            );
            None
        }
        _ => {
            d.error(
                node.span,
                path,
                format!("unknown protocol {s:?}; expected TCP, UDP, SCTP or ANY"),
            );
            None
        }
    }
}

fn l7_rules(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    dir: Direction,
    ctx: &RuleCtx,
    ports: &[(PortProtocol, Span, Path)],
) -> Option<L7Rules> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let http = m.take_some("http");
    let kafka = m.take_some("kafka");
    let dns = m.take_some("dns");
    for generic in ["l7proto", "l7"] {
        if m.take_some(generic).is_some() {
            m.error_at(
                d,
                generic,
                format!("{generic}: generic L7 protocol rules (proxylib) are not supported yet"),
            );
        }
    }
    let present: Vec<&str> = [("http", http), ("kafka", kafka), ("dns", dns)]
        .iter()
        .filter(|(_, n)| n.is_some())
        .map(|(k, _)| *k)
        .collect();
    if present.len() > 1 {
        m.error_at(
            d,
            present[1],
            format!(
                "only one L7 protocol per toPorts entry: {} and {} given",
                present[0], present[1]
            ),
        );
    }
    let first_key = present.first().copied();
    m.finish(d);
    let Some(kind) = first_key else {
        // `rules: {}`: no L7 rules.
        return None;
    };
    let key_span = node.get(kind).map_or(node.span, |n| n.span);
    let kpath = path.key(kind);
    // Host policies take DNS rules and no other L7 rules, as current Cilium documents it
    // (host L7 DNS policies, beta there; earlier releases refused every L7 rule in a host
    // policy). On a machine with no workloads the host is the only endpoint, and naming what
    // its own processes may resolve is the point of the product: the DNS proxy judges a host
    // query like any endpoint's, through the host's egress map.
    if ctx.host_policy && kind != "dns" {
        d.error(
            key_span,
            &kpath,
            format!(
                "{kind} rules are not supported in host policies (nodeSelector), as in Cilium; \
                 host policies take DNS rules only"
            ),
        );
    }
    if kind == "dns" && dir == Direction::Ingress {
        d.error(key_span, &kpath, "DNS rules are not allowed on ingress");
    }
    // Port checks of Cilium's PortRule.Validate / PortProtocol.Validate.
    for (pp, span, ppath) in ports {
        if pp.port == Port::Any {
            d.error(
                *span,
                ppath,
                "L7 rules cannot be used when a port is 0 (every port)",
            );
        }
        if kind == "dns" {
            if pp.end_port.is_some() {
                d.error(*span, ppath, "DNS rules do not support port ranges");
            }
        } else if pp.protocol != Protocol::Tcp {
            d.error(
                *span,
                ppath,
                format!(
                    "{kind} rules only apply to TCP ports (not {}); set `protocol: TCP`",
                    pp.protocol.as_str()
                ),
            );
        }
    }
    // Cilium requires ports for DNS rules (rule_validation.go: "Port 53 must be specified for
    // DNS rules"). For HTTP and Kafka it accepts an entry without ports but then creates no L4
    // filter for it, so the rules silently do nothing; fqdnwall's model would instead read the
    // entry as "every port and protocol" and send UDP and ICMP to a TCP proxy. Either way the
    // policy cannot mean what it says, so it is an error.
    if ports.is_empty() {
        let msg = if kind == "dns" {
            "DNS rules need an explicit port (usually port 53 with protocol ANY)".to_string()
        } else {
            format!("{kind} rules need an explicit TCP port (`ports: [{{port: \"80\", protocol: TCP}}]`)")
        };
        d.error(key_span, &kpath, msg);
    }
    let rules = match kind {
        "http" => http_rules(d, http?, &kpath).map(L7Rules::Http),
        "kafka" => kafka_rules(d, kafka?, &kpath).map(L7Rules::Kafka),
        _ => dns_rules(d, dns?, &kpath).map(L7Rules::Dns),
    };
    if d.error_count() > before {
        return None;
    }
    rules
}

fn dns_rules(d: &mut Decoder, node: &Node, path: &Path) -> Option<Vec<DnsRule>> {
    let items = d.expect_seq(node, path)?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match name_or_pattern(d, item, &path.index(i)) {
            Some(NameOrPattern::Name(n)) => out.push(DnsRule::MatchName(n)),
            Some(NameOrPattern::Pattern(p)) => out.push(DnsRule::MatchPattern(p)),
            None => {}
        }
    }
    Some(out)
}

/// Compiles an HTTP field the way the L7 matcher will use it (anchored), to catch bad
/// regular expressions at load time.
fn http_regex(d: &mut Decoder, node: &Node, path: &Path) -> Option<String> {
    let s = d.expect_str(node, path)?;
    match Regex::new(&format!("^(?:{s})$")) {
        Ok(_) => Some(s.to_string()),
        Err(e) => {
            let msg = e.to_string();
            let last = msg.lines().last().unwrap_or("").trim().to_string();
            d.error(
                node.span,
                path,
                format!("invalid regular expression {s:?}: {last}"),
            );
            None
        }
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn http_rules(d: &mut Decoder, node: &Node, path: &Path) -> Option<Vec<HttpRule>> {
    let items = d.expect_seq(node, path)?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = path.index(i);
        let Some(mut m) = d.expect_map(item, &p) else {
            continue;
        };
        let mut rule = HttpRule::default();
        for (field, slot) in [("method", 0), ("path", 1), ("host", 2)] {
            if let Some(n) = m.take_some(field) {
                let v = http_regex(d, n, &p.key(field));
                match slot {
                    0 => rule.method = v,
                    1 => rule.path = v,
                    _ => rule.host = v,
                }
            }
        }
        if let Some(n) = m.take_some("headers") {
            let hp = p.key("headers");
            if let Some(list) = d.expect_str_list(n, &hp) {
                for (j, (s, span)) in list.into_iter().enumerate() {
                    if let Some(h) = header_rule(s) {
                        rule.headers.push(h);
                    } else {
                        d.error(
                            span,
                            &hp.index(j),
                            format!("invalid header {s:?}: expected \"Name: value\" or \"Name\""),
                        );
                    }
                }
            }
        }
        if let Some(n) = m.take_some("headerMatches") {
            let hp = p.key("headerMatches");
            if let Some(list) = d.expect_seq(n, &hp) {
                for (j, hm) in list.iter().enumerate() {
                    if let Some(h) = header_match(d, hm, &hp.index(j)) {
                        rule.header_matches.push(h);
                    }
                }
            }
        }
        m.finish(d);
        out.push(rule);
    }
    Some(out)
}

/// `"Name: value"` (exact value), `"Name value"` (Cilium's space-separated form) or `"Name"`
/// (presence).
fn header_rule(s: &str) -> Option<HeaderRule> {
    let s = s.trim();
    let (name, value) = if let Some((n, v)) = s.split_once(':') {
        (n.trim(), Some(v.trim()))
    } else if let Some((n, v)) = s.split_once(char::is_whitespace) {
        (n.trim(), Some(v.trim()))
    } else {
        (s, None)
    };
    if name.is_empty() || !name.chars().all(is_token_char) {
        return None;
    }
    Some(HeaderRule {
        name: name.to_string(),
        value: value.map(str::to_string),
    })
}

fn header_match(d: &mut Decoder, node: &Node, path: &Path) -> Option<HeaderMatch> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let name = m
        .require(d, "name")
        .and_then(|n| d.expect_nonempty_str(n, &path.key("name")));
    if let Some(n) = name {
        if !n.chars().all(is_token_char) {
            m.error_at(d, "name", format!("invalid header name {n:?}"));
        }
    }
    let value = m
        .take_some("value")
        .and_then(|n| d.expect_str(n, &path.key("value")))
        .map(str::to_string);
    let mut secret = None;
    if let Some(s) = m.take_some("secret") {
        let sp = path.key("secret");
        if let Some(mut sm) = d.expect_map(s, &sp) {
            let sname = sm
                .require(d, "name")
                .and_then(|n| d.expect_nonempty_str(n, &sp.key("name")));
            let sns = sm
                .take_some("namespace")
                .and_then(|n| d.expect_str(n, &sp.key("namespace")));
            sm.finish(d);
            secret = sname.map(|n| SecretRef {
                namespace: sns.map(str::to_string),
                name: n.to_string(),
            });
        }
    }
    let mut mismatch = None;
    if let Some(mm) = m.take_some("mismatch") {
        let mp = path.key("mismatch");
        mismatch = match d.expect_str(mm, &mp) {
            Some("LOG") => Some(MismatchAction::Log),
            Some("ADD") => Some(MismatchAction::Add),
            Some("DELETE") => Some(MismatchAction::Delete),
            Some("REPLACE") => Some(MismatchAction::Replace),
            Some(other) => {
                d.error(
                    mm.span,
                    &mp,
                    format!(
                        "unknown mismatch action {other:?}; expected LOG, ADD, DELETE or REPLACE"
                    ),
                );
                None
            }
            None => None,
        };
    }
    m.finish(d);
    if d.error_count() > before {
        return None;
    }
    Some(HeaderMatch {
        name: name?.to_string(),
        value,
        secret,
        mismatch,
    })
}

/// Kafka API key names and numbers, as Cilium's kafka policy (pkg/policy/api/kafka) maps them.
const KAFKA_API_KEYS: &[(&str, i16)] = &[
    ("produce", 0),
    ("fetch", 1),
    ("offsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
    ("deleterecords", 21),
    ("initproducerid", 22),
    ("offsetforleaderepoch", 23),
    ("addpartitionstotxn", 24),
    ("addoffsetstotxn", 25),
    ("endtxn", 26),
    ("writetxnmarkers", 27),
    ("txnoffsetcommit", 28),
    ("describeacls", 29),
    ("createacls", 30),
    ("deleteacls", 31),
    ("describeconfigs", 32),
    ("alterconfigs", 33),
];

/// `role: produce` → produce, metadata, apiversions (Cilium's `GetAPIKeys`).
pub const KAFKA_PRODUCE_KEYS: &[i16] = &[0, 3, 18];
/// `role: consume` → fetch, offsets, metadata, offsetcommit, offsetfetch, findcoordinator,
/// joingroup, heartbeat, leavegroup, syncgroup, apiversions.
pub const KAFKA_CONSUME_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18];

/// Longest Kafka topic Cilium accepts (Kafka itself caps at 249 since 0.10).
const KAFKA_MAX_TOPIC_LEN: usize = 255;

fn kafka_rules(d: &mut Decoder, node: &Node, path: &Path) -> Option<Vec<KafkaRule>> {
    let items = d.expect_seq(node, path)?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(r) = kafka_rule(d, item, &path.index(i)) {
            out.push(r);
        }
    }
    Some(out)
}

fn kafka_rule(d: &mut Decoder, node: &Node, path: &Path) -> Option<KafkaRule> {
    let before = d.error_count();
    let mut m = d.expect_map(node, path)?;
    let role_n = m.take_some("role");
    let key_n = m.take_some("apiKey");
    let version_n = m.take_some("apiVersion");
    let client_n = m.take_some("clientID");
    let topic_n = m.take_some("topic");
    m.finish(d);
    let mut rule = KafkaRule::default();
    let role = role_n.and_then(|n| d.expect_str(n, &path.key("role")));
    let key = key_n.and_then(|n| d.expect_str(n, &path.key("apiKey")));
    if let (Some(r), Some(k)) = (role, key) {
        if !r.is_empty() && !k.is_empty() {
            d.error(
                key_n?.span,
                &path.key("apiKey"),
                format!("cannot set both role {r:?} and apiKey {k:?}"),
            );
        }
    }
    if let Some(r) = role.filter(|r| !r.is_empty()) {
        match r.to_ascii_lowercase().as_str() {
            "produce" => {
                rule.role = Some(KafkaRole::Produce);
                rule.api_keys = KAFKA_PRODUCE_KEYS.to_vec();
            }
            "consume" => {
                rule.role = Some(KafkaRole::Consume);
                rule.api_keys = KAFKA_CONSUME_KEYS.to_vec();
            }
            _ => d.error(
                role_n?.span,
                &path.key("role"),
                format!("invalid Kafka role {r:?}; expected produce or consume"),
            ),
        }
    }
    if let Some(k) = key.filter(|k| !k.is_empty()) {
        let lower = k.to_ascii_lowercase();
        match KAFKA_API_KEYS.iter().find(|(n, _)| *n == lower) {
            Some((_, num)) => rule.api_keys = vec![*num],
            None => d.error(
                key_n?.span,
                &path.key("apiKey"),
                format!("unknown Kafka apiKey {k:?} (names as in the Kafka protocol, e.g. produce, fetch, metadata)"),
            ),
        }
    }
    if let Some(v) = version_n {
        let vp = path.key("apiVersion");
        let parsed = match &v.value {
            crate::yaml::Value::Int(i) => Some(*i),
            crate::yaml::Value::Str(s) if s.is_empty() => None,
            crate::yaml::Value::Str(s) => s.parse::<i64>().ok().or(Some(-1)),
            _ => Some(-1),
        };
        match parsed {
            Some(n) if (0..=i16::MAX as i64).contains(&n) => rule.api_version = Some(n as i16),
            Some(_) => d.error(
                v.span,
                &vp,
                format!(
                    "invalid Kafka apiVersion {}: expected a number 0-32767",
                    v.value
                ),
            ),
            None => {}
        }
    }
    if let Some(c) = client_n.and_then(|n| d.expect_str(n, &path.key("clientID"))) {
        if !c.is_empty() {
            rule.client_id = Some(c.to_string());
        }
    }
    if let Some(t) = topic_n.and_then(|n| d.expect_str(n, &path.key("topic"))) {
        if t.len() > KAFKA_MAX_TOPIC_LEN {
            d.error(
                topic_n?.span,
                &path.key("topic"),
                format!(
                    "Kafka topic is {} characters long, at most {KAFKA_MAX_TOPIC_LEN}",
                    t.len()
                ),
            );
        } else if !t.is_empty() {
            if let Some(c) = t
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                d.error(
                    topic_n?.span,
                    &path.key("topic"),
                    format!("invalid Kafka topic {t:?}: {c:?} is not allowed (letters, digits, '.', '_', '-')"),
                );
            } else {
                rule.topic = Some(t.to_string());
            }
        }
    }
    if d.error_count() > before {
        return None;
    }
    Some(rule)
}

/// ICMP type names per family (Cilium's icmp.go).
const ICMPV4_TYPES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];
const ICMPV6_TYPES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

fn icmp_rule(d: &mut Decoder, node: &Node, path: &Path, out: &mut Vec<IcmpField>) {
    let Some(mut m) = d.expect_map(node, path) else {
        return;
    };
    let fields = m.take_some("fields");
    m.finish(d);
    let Some(fields) = fields else { return };
    let fp = path.key("fields");
    let Some(items) = d.expect_seq(fields, &fp) else {
        return;
    };
    if items.len() > MAX_ICMP_FIELDS {
        d.error(
            fields.span,
            &fp,
            format!(
                "too many ICMP types ({}), at most {MAX_ICMP_FIELDS}",
                items.len()
            ),
        );
    }
    for (i, item) in items.iter().enumerate() {
        let p = fp.index(i);
        let Some(mut f) = d.expect_map(item, &p) else {
            continue;
        };
        let family_n = f.take_some("family");
        let type_n = f.require(d, "type");
        f.finish(d);
        let family = match family_n {
            None => Some(IpFamily::V4),
            Some(n) => match d.expect_str(n, &p.key("family")) {
                Some("IPv4") => Some(IpFamily::V4),
                Some("IPv6") => Some(IpFamily::V6),
                Some(other) => {
                    d.error(
                        n.span,
                        &p.key("family"),
                        format!("unknown ICMP family {other:?}; expected IPv4 or IPv6"),
                    );
                    None
                }
                None => None,
            },
        };
        let (Some(family), Some(tn)) = (family, type_n) else {
            continue;
        };
        let tp = p.key("type");
        let names = match family {
            IpFamily::V4 => ICMPV4_TYPES,
            IpFamily::V6 => ICMPV6_TYPES,
        };
        let fam = if family == IpFamily::V4 {
            "IPv4"
        } else {
            "IPv6"
        };
        let icmp_type = match &tn.value {
            crate::yaml::Value::Int(i) if (0..=255).contains(i) => Some(*i as u8),
            crate::yaml::Value::Int(i) => {
                d.error(tn.span, &tp, format!("ICMP type {i} is out of range 0-255"));
                None
            }
            crate::yaml::Value::Str(s) => {
                if let Ok(n) = s.parse::<i64>() {
                    if (0..=255).contains(&n) {
                        Some(n as u8)
                    } else {
                        d.error(tn.span, &tp, format!("ICMP type {n} is out of range 0-255"));
                        None
                    }
                } else if let Some((_, t)) = names.iter().find(|(n, _)| n == s) {
                    Some(*t)
                } else {
                    d.error(
                        tn.span,
                        &tp,
                        format!(
                            "unknown {fam} ICMP type {s:?}; expected a number 0-255 or one of: {}",
                            names.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                        ),
                    );
                    None
                }
            }
            other => {
                d.error(
                    tn.span,
                    &tp,
                    format!(
                        "expected an ICMP type number or name, found {}",
                        other.type_name()
                    ),
                );
                None
            }
        };
        if let Some(icmp_type) = icmp_type {
            out.push(IcmpField { family, icmp_type });
        }
    }
}

/// For a caller-level check that a policy kind allows `nodeSelector`.
pub(crate) fn allows_node_selector(kind: PolicyKind) -> bool {
    matches!(
        kind,
        PolicyKind::CiliumClusterwideNetworkPolicy | PolicyKind::RuleList
    )
}
