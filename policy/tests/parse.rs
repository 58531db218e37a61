//! Every policy feature parses to the expected model.

use policy::error::Span;
use policy::fqdn::{DnsName, FqdnPattern};
use policy::labels::{LabelKey, LabelSelector, Operator, Requirement};
use policy::model::*;
use policy::parse::{parse_policies, parse_policy_file, KAFKA_CONSUME_KEYS, KAFKA_PRODUCE_KEYS};

fn parse(text: &str) -> Vec<Policy> {
    match parse_policies("test.yaml", text) {
        Ok(p) => p,
        Err(d) => panic!(
            "unexpected errors:\n{}",
            d.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn cnp(spec: &str) -> Rule {
    let text = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: team\nspec:\n{}",
        indent(spec)
    );
    let mut p = parse(&text);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].rules.len(), 1);
    p.remove(0).rules.remove(0)
}

fn ccnp(spec: &str) -> Rule {
    let text = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: p\nspec:\n{}",
        indent(spec)
    );
    parse(&text).remove(0).rules.remove(0)
}

fn knp(spec: &str) -> Rule {
    let text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: team\nspec:\n{}",
        indent(spec)
    );
    parse(&text).remove(0).rules.remove(0)
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn key(k: &str) -> LabelKey {
    LabelKey::parse(k)
}

fn is(k: &str, v: &str) -> Requirement {
    Requirement {
        key: key(k),
        op: Operator::In(vec![v.to_string()]),
    }
}

fn exists(k: &str) -> Requirement {
    Requirement {
        key: key(k),
        op: Operator::Exists,
    }
}

fn sel(mut reqs: Vec<Requirement>) -> LabelSelector {
    reqs.sort();
    LabelSelector { requirements: reqs }
}

const NS: &str = "k8s:io.kubernetes.pod.namespace";

fn endpoints(p: &PeerRule) -> Vec<LabelSelector> {
    match &p.peers {
        Peers::Selectors(s) => s
            .iter()
            .map(|s| match s {
                PeerSelector::Endpoints(l) => l.clone(),
                other => panic!("not an endpoint selector: {other:?}"),
            })
            .collect(),
        other => panic!("not selectors: {other:?}"),
    }
}

#[test]
fn cnp_namespace_scoping() {
    let r = cnp("endpointSelector:\n  matchLabels: {app: web}\ningress:\n- fromEndpoints:\n  - matchLabels: {app: lb}\n  - matchLabels: {k8s:io.kubernetes.pod.namespace: other, app: x}\n  - matchLabels: {reserved:host: ''}\n  - matchLabels: {io.cilium.k8s.namespace.labels.team: a}\n  - {}\n");
    assert_eq!(
        r.subject,
        Subject::Endpoints(sel(vec![is("app", "web"), is(NS, "team")]))
    );
    let e = endpoints(&r.allow.ingress[0]);
    let expected = vec![
        sel(vec![is("app", "lb"), is(NS, "team")]),
        sel(vec![is(NS, "other"), is("app", "x")]),
        sel(vec![is("reserved:host", "")]),
        sel(vec![is("io.cilium.k8s.namespace.labels.team", "a")]),
        sel(vec![is(NS, "team")]),
    ];
    for x in &expected {
        assert!(e.contains(x), "{x:?} missing from {e:?}");
    }
    assert_eq!(e.len(), expected.len());
}

#[test]
fn namespace_defaults_to_default() {
    let p = parse("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n");
    assert_eq!(p[0].namespace.as_deref(), Some("default"));
    assert_eq!(p[0].display_name(), "default/p");
    assert_eq!(p[0].kind, PolicyKind::CiliumNetworkPolicy);
    assert_eq!(&*p[0].file, "test.yaml");
    assert_eq!(
        p[0].rules[0].subject,
        Subject::Endpoints(sel(vec![is(NS, "default")]))
    );
}

#[test]
fn ccnp_scoping_and_node_selector() {
    let r = ccnp("endpointSelector: {}\negress:\n- toEndpoints:\n  - matchLabels: {app: db}\n  - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}\n");
    assert_eq!(r.subject, Subject::Endpoints(LabelSelector::default()));
    let e = endpoints(&r.allow.egress[0]);
    assert!(e.contains(&sel(vec![is("app", "db"), exists(NS)])));
    assert!(e.contains(&sel(vec![is(NS, "kube-system")])));

    let r =
        ccnp("nodeSelector:\n  matchLabels: {role: worker}\ningress:\n- fromEntities: [cluster]\n");
    assert_eq!(r.subject, Subject::Nodes(sel(vec![is("role", "worker")])));
    assert_eq!(
        r.allow.ingress[0].peers,
        Peers::Selectors(vec![PeerSelector::Entity(Entity::Cluster)])
    );

    // Rules selecting initializing endpoints do not restrict peers to namespaced endpoints.
    let r = ccnp("endpointSelector:\n  matchLabels: {reserved:init: ''}\negress:\n- toEndpoints: [{matchLabels: {app: db}}]\n");
    assert_eq!(
        endpoints(&r.allow.egress[0]),
        vec![sel(vec![is("app", "db")])]
    );
}

#[test]
fn rule_list_json() {
    let p = parse_policies(
        "/etc/fqdnwall/policies/list.json",
        r#"[{"endpointSelector": {"matchLabels": {"role": "restricted"}}, "egress": []},
            {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {"a": "b"}}]}],
             "labels": [{"key": "name", "value": "x", "source": "unspec"}, "k8s:team=a"],
             "description": "d"}]"#,
    )
    .unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].kind, PolicyKind::RuleList);
    assert_eq!(p[0].name, "list.json");
    assert_eq!(p[0].namespace, None);
    assert_eq!(p[0].rules.len(), 2);
    // No namespace scoping in plain rule lists.
    assert_eq!(
        p[0].rules[0].subject,
        Subject::Endpoints(sel(vec![is("role", "restricted")]))
    );
    assert_eq!(
        endpoints(&p[0].rules[1].allow.ingress[0]),
        vec![sel(vec![is("a", "b")])]
    );
    assert_eq!(p[0].rules[1].description.as_deref(), Some("d"));
    assert_eq!(p[0].rules[1].span, Span::new(2, 13));
}

#[test]
fn specs_and_spec_together() {
    let p = parse("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\nspecs:\n- endpointSelector: {matchLabels: {a: b}}\n  egress: [{}]\n- endpointSelector: {matchLabels: {c: d}}\n  egressDeny: [{toEntities: [world]}]\n");
    assert_eq!(p[0].rules.len(), 3);
    assert_eq!(p[0].rules[1].span, Span::new(8, 3));
    assert!(p[0].rules[2].default_deny.egress);
    assert_eq!(p[0].rules[2].deny.egress.len(), 1);
}

#[test]
fn default_deny_sections() {
    // Absent: the direction is not touched.
    let r = cnp("endpointSelector: {}\ningress: [{}]\n");
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: true,
            egress: false
        }
    );
    assert_eq!(
        r.has_direction,
        PerDir {
            ingress: true,
            egress: false
        }
    );
    // `egress:` with no value, `egress: []` and `egress: [{}]` all enforce egress and allow nothing.
    for section in ["egress:\n", "egress: []\n", "egress: [{}]\n"] {
        let r = cnp(&format!("endpointSelector: {{}}\n{section}"));
        assert!(r.default_deny.egress, "{section}");
        assert!(r.has_direction.egress, "{section}");
        assert!(!r.has_direction.ingress, "{section}");
        assert!(r
            .allow
            .egress
            .iter()
            .all(|p| p.peers == Peers::Selectors(vec![]) && p.ports.is_empty()));
    }
    // A deny section also enforces its direction.
    let r = cnp("endpointSelector: {}\ningressDeny: [{fromEntities: [world]}]\n");
    assert!(r.default_deny.ingress);
    // enableDefaultDeny switches it off per direction.
    let r = cnp("endpointSelector: {}\ningress: [{fromEntities: [world]}]\negress: [{toEntities: [world]}]\nenableDefaultDeny: {ingress: false}\n");
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: false,
            egress: true
        }
    );
    assert_eq!(
        r.has_direction,
        PerDir {
            ingress: true,
            egress: true
        }
    );
}

#[test]
fn peers_wildcards() {
    let r = cnp("endpointSelector: {}\ningress:\n- {}\n- toPorts: [{ports: [{port: '80'}]}]\n- fromEntities: [all]\n- fromEndpoints: []\n- icmps: [{fields: [{type: 8}]}]\n");
    let peers: Vec<_> = r.allow.ingress.iter().map(|p| p.peers.clone()).collect();
    assert_eq!(
        peers,
        vec![
            Peers::Selectors(vec![]),
            Peers::All,
            Peers::All,
            Peers::Selectors(vec![]),
            Peers::All,
        ]
    );
}

#[test]
fn entities() {
    let r = cnp("endpointSelector: {}\negress:\n- toEntities: [world, cluster, host, remote-node, kube-apiserver, world-ipv4, world-ipv6, ingress, init, health, unmanaged]\n");
    let Peers::Selectors(s) = &r.allow.egress[0].peers else {
        panic!()
    };
    assert_eq!(s.len(), 11);
    assert!(s.contains(&PeerSelector::Entity(Entity::KubeApiserver)));
}

#[test]
fn cidrs() {
    let r = cnp("endpointSelector: {}\negress:\n- toCIDR: [10.1.2.3/8, 192.0.2.7, '2001:db8::/32']\n  toCIDRSet:\n  - cidr: 0.0.0.0/0\n    except: [10.0.0.0/8, 192.168.1.1/16]\n");
    let Peers::Selectors(s) = &r.allow.egress[0].peers else {
        panic!()
    };
    let cidr = |c: &str, ex: &[&str]| {
        PeerSelector::Cidr(CidrSelector {
            cidr: c.parse().unwrap(),
            except: ex.iter().map(|e| e.parse().unwrap()).collect(),
        })
    };
    for want in [
        cidr("10.0.0.0/8", &[]),
        cidr("192.0.2.7/32", &[]),
        cidr("2001:db8::/32", &[]),
        cidr("0.0.0.0/0", &["10.0.0.0/8", "192.168.0.0/16"]),
    ] {
        assert!(s.contains(&want), "{want:?} not in {s:?}");
    }
}

#[test]
fn fqdns() {
    let r = cnp("endpointSelector: {}\negress:\n- toFQDNs:\n  - matchName: API.Example.com\n  - matchPattern: '*.cilium.io'\n  toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n");
    let Peers::Fqdns(f) = &r.allow.egress[0].peers else {
        panic!()
    };
    assert!(f.contains(&FqdnSelector::MatchName(DnsName::new("api.example.com."))));
    assert!(f.contains(&FqdnSelector::MatchPattern(
        FqdnPattern::parse("*.cilium.io.").unwrap()
    )));
    assert_eq!(r.allow.egress[0].ports[0].ports[0].port, Port::Number(443));
}

#[test]
fn ports() {
    let r = cnp("endpointSelector: {}\ningress:\n- toPorts:\n  - ports:\n    - {port: '80', protocol: tcp}\n    - {port: 53}\n    - {port: HTTP-Alt, protocol: TCP}\n    - {port: '8000', endPort: 8080, protocol: UDP}\n    - {port: '0', protocol: SCTP}\n    - {protocol: TCP}\n    - {port: '9000', endPort: 9000}\n");
    let pp = &r.allow.ingress[0].ports[0].ports;
    let p = |port, end_port, protocol| PortProtocol {
        port,
        end_port,
        protocol,
    };
    assert_eq!(
        pp,
        &vec![
            p(Port::Number(80), None, Protocol::Tcp),
            p(Port::Number(53), None, Protocol::Any),
            p(Port::Named("http-alt".into()), None, Protocol::Tcp),
            p(Port::Number(8000), Some(8080), Protocol::Udp),
            p(Port::Any, None, Protocol::Sctp),
            p(Port::Any, None, Protocol::Tcp),
            p(Port::Number(9000), None, Protocol::Any),
        ]
    );
    assert_eq!(r.allow.ingress[0].peers, Peers::All);
}

#[test]
fn icmps() {
    let r = cnp("endpointSelector: {}\negress:\n- icmps:\n  - fields:\n    - {type: 8}\n    - {type: EchoRequest, family: IPv6}\n    - {type: '0', family: IPv4}\n    - {type: TimeExceeded}\n");
    let f = &r.allow.egress[0].icmps;
    let i = |family, icmp_type| IcmpField { family, icmp_type };
    assert_eq!(
        f,
        &vec![
            i(IpFamily::V4, 8),
            i(IpFamily::V6, 128),
            i(IpFamily::V4, 0),
            i(IpFamily::V4, 11),
        ]
    );
}

#[test]
fn http_rules() {
    let r = cnp("endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n    rules:\n      HTTP:\n      - method: GET\n        path: /public/.*\n        host: '^api\\.example\\.com$'\n        headers: ['X-My-Header: true', 'X-Present']\n        headerMatches:\n        - {name: X-Token, value: abc, mismatch: REPLACE}\n        - name: X-Secret\n          secret: {namespace: ns, name: s}\n      - {}\n");
    let Some(L7Rules::Http(h)) = &r.allow.ingress[0].ports[0].l7 else {
        panic!()
    };
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].method.as_deref(), Some("GET"));
    assert_eq!(h[0].path.as_deref(), Some("/public/.*"));
    assert_eq!(h[0].host.as_deref(), Some("^api\\.example\\.com$"));
    assert_eq!(
        h[0].headers,
        vec![
            HeaderRule {
                name: "X-My-Header".into(),
                value: Some("true".into())
            },
            HeaderRule {
                name: "X-Present".into(),
                value: None
            },
        ]
    );
    assert_eq!(
        h[0].header_matches,
        vec![
            HeaderMatch {
                name: "X-Token".into(),
                value: Some("abc".into()),
                secret: None,
                mismatch: Some(MismatchAction::Replace)
            },
            HeaderMatch {
                name: "X-Secret".into(),
                value: None,
                secret: Some(SecretRef {
                    namespace: Some("ns".into()),
                    name: "s".into()
                }),
                mismatch: None
            },
        ]
    );
    assert_eq!(h[1], HttpRule::default());
}

#[test]
fn kafka_rules() {
    assert_eq!(KAFKA_PRODUCE_KEYS, &[0, 3, 18]);
    assert_eq!(KAFKA_CONSUME_KEYS, &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18]);
    let r = cnp("endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '9092', protocol: TCP}]\n    rules:\n      kafka:\n      - {role: Produce, topic: deathstar-plans}\n      - {role: consume}\n      - {apiKey: FindCoordinator, apiVersion: '2', clientID: c1}\n      - {apiKey: deletetopics, apiVersion: 0}\n");
    let Some(L7Rules::Kafka(k)) = &r.allow.ingress[0].ports[0].l7 else {
        panic!()
    };
    assert_eq!(k[0].role, Some(KafkaRole::Produce));
    assert_eq!(k[0].api_keys, vec![0, 3, 18]);
    assert_eq!(k[0].topic.as_deref(), Some("deathstar-plans"));
    assert_eq!(k[1].api_keys, KAFKA_CONSUME_KEYS.to_vec());
    assert_eq!(k[2].api_keys, vec![10]);
    assert_eq!(k[2].api_version, Some(2));
    assert_eq!(k[2].client_id.as_deref(), Some("c1"));
    assert_eq!(k[3].api_keys, vec![20]);
    assert_eq!(k[3].api_version, Some(0));
}

#[test]
fn dns_rules() {
    let r = cnp("endpointSelector: {}\negress:\n- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]\n  toPorts:\n  - ports: [{port: '53', protocol: ANY}]\n    rules:\n      dns:\n      - matchPattern: '*'\n      - matchName: cilium.io\n");
    let pr = &r.allow.egress[0].ports[0];
    assert_eq!(
        pr.l7,
        Some(L7Rules::Dns(vec![
            DnsRule::MatchPattern(FqdnPattern::parse("*").unwrap()),
            DnsRule::MatchName(DnsName::new("cilium.io")),
        ]))
    );
    assert_eq!(
        endpoints(&r.allow.egress[0]),
        vec![sel(vec![is(NS, "kube-system"), is("k8s-app", "kube-dns")])]
    );
}

/// DNS rules in a host policy's egress are accepted (the host's own name filtering); HTTP and
/// Kafka rules there are not.
#[test]
fn dns_rules_in_host_policies() {
    let r = ccnp("nodeSelector:\n  matchLabels: {role: vm}\negress:\n- toEntities: [world]\n  toPorts:\n  - ports: [{port: '53', protocol: ANY}]\n    rules:\n      dns:\n      - matchPattern: '*.allowed.test'\n      - matchName: Exact.Allowed.Test\n- toPorts:\n  - ports: [{port: '5353', protocol: UDP}]\n    rules:\n      dns: [{matchPattern: '**.internal.test'}]\n- toFQDNs: [{matchPattern: '*.allowed.test'}]\n  toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n");
    assert_eq!(r.subject, Subject::Nodes(sel(vec![is("role", "vm")])));
    assert_eq!(
        r.allow.egress[0].peers,
        Peers::Selectors(vec![PeerSelector::Entity(Entity::World)])
    );
    let pr = &r.allow.egress[0].ports[0];
    assert_eq!(pr.ports[0].port, Port::Number(53));
    assert_eq!(pr.ports[0].protocol, Protocol::Any);
    assert_eq!(
        pr.l7,
        Some(L7Rules::Dns(vec![
            DnsRule::MatchPattern(FqdnPattern::parse("*.allowed.test").unwrap()),
            DnsRule::MatchName(DnsName::new("exact.allowed.test")),
        ]))
    );
    // No L3 peer: the DNS rules apply to every server on that port.
    assert_eq!(r.allow.egress[1].peers, Peers::All);
    assert_eq!(
        r.allow.egress[1].ports[0].l7,
        Some(L7Rules::Dns(vec![DnsRule::MatchPattern(
            FqdnPattern::parse("**.internal.test").unwrap()
        )]))
    );
    assert!(matches!(r.allow.egress[2].peers, Peers::Fqdns(_)));

    // A plain rule list (what `cilium policy import` takes) may hold host rules too.
    let p = parse("- nodeSelector: {}\n  egress:\n  - toPorts:\n    - ports: [{port: '53', protocol: UDP}]\n      rules:\n        dns: [{matchName: a.allowed.test}]\n");
    assert_eq!(
        p[0].rules[0].subject,
        Subject::Nodes(LabelSelector::default())
    );
    assert!(matches!(
        p[0].rules[0].allow.egress[0].ports[0].l7,
        Some(L7Rules::Dns(_))
    ));

    // HTTP and Kafka stay refused in host policies, with the place and the reason.
    // The diagnostic points at the rule list (the value of `http:` / `kafka:`).
    for (rules, port, kind, col) in [
        ("http: [{method: GET}]", "80", "http", 21),
        ("kafka: [{topic: orders}]", "9092", "kafka", 22),
    ] {
        let text = format!("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: h\nspec:\n  nodeSelector: {{}}\n  egress:\n  - toPorts:\n    - ports: [{{port: '{port}', protocol: TCP}}]\n      rules: {{{rules}}}\n");
        let errs: Vec<String> = parse_policies("host.yaml", &text)
            .unwrap_err()
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            errs,
            vec![format!("host.yaml:10:{col}: spec.egress[0].toPorts[0].rules.{kind}: {kind} rules are not supported in host policies (nodeSelector), as in Cilium; host policies take DNS rules only")]
        );
    }
}

#[test]
fn server_names() {
    let r = cnp("endpointSelector: {}\negress:\n- toPorts:\n  - ports: [{port: '443', protocol: TCP}]\n    serverNames: [one.one.one.one]\n");
    assert_eq!(
        r.allow.egress[0].ports[0].server_names,
        vec!["one.one.one.one".to_string()]
    );
}

#[test]
fn deny_rules() {
    let r = cnp("endpointSelector: {}\negressDeny:\n- toCIDRSet: [{cidr: 10.0.0.0/8}]\n  toPorts: [{ports: [{port: '22', protocol: TCP}]}]\ningressDeny:\n- fromEntities: [world]\n  icmps: [{fields: [{type: 8}]}]\n");
    assert_eq!(r.deny.egress.len(), 1);
    assert_eq!(r.deny.egress[0].ports[0].ports[0].port, Port::Number(22));
    assert_eq!(r.deny.ingress[0].icmps.len(), 1);
    assert!(r.allow.egress.is_empty());
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: true,
            egress: true
        }
    );
}

#[test]
fn from_nodes_selects_the_host() {
    let r = cnp("endpointSelector: {}\ningress:\n- fromNodes: [{matchLabels: {role: worker}}]\n");
    assert_eq!(
        endpoints(&r.allow.ingress[0]),
        vec![sel(vec![is("role", "worker"), exists("reserved:host")])]
    );
}

#[test]
fn match_expressions() {
    let r = cnp("endpointSelector:\n  matchExpressions:\n  - {key: env, operator: in, values: [prod, staging]}\n  - {key: tier, operator: NotIn, values: [db]}\n  - {key: legacy, operator: DoesNotExist}\ningress: [{}]\n");
    let Subject::Endpoints(s) = &r.subject else {
        panic!()
    };
    assert!(s.requirements.contains(&Requirement {
        key: key("env"),
        op: Operator::In(vec!["prod".into(), "staging".into()])
    }));
    assert!(s.requirements.contains(&Requirement {
        key: key("tier"),
        op: Operator::NotIn(vec!["db".into()])
    }));
    assert!(s.requirements.contains(&Requirement {
        key: key("legacy"),
        op: Operator::DoesNotExist
    }));
}

#[test]
fn peer_rule_spans() {
    let r = cnp("endpointSelector: {}\negress:\n- toEntities: [world]\n- toEntities: [host]\n");
    // Document lines: 1-5 header, spec body from line 7.
    assert_eq!(r.span, Span::new(7, 3));
    assert_eq!(r.allow.egress[0].span, Span::new(9, 5));
    assert_eq!(r.allow.egress[1].span, Span::new(10, 5));
}

#[test]
fn network_policy_translation() {
    let r = knp("podSelector:\n  matchLabels: {app: web}\npolicyTypes: [Ingress, Egress]\ningress:\n- from:\n  - podSelector: {matchLabels: {role: lb}}\n  - namespaceSelector: {matchLabels: {team: a}}\n    podSelector: {matchLabels: {role: mon}}\n  - namespaceSelector: {}\n  - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}\n  ports:\n  - {port: 80}\n  - {protocol: UDP, port: dns}\n  - {port: 8000, endPort: 9000}\n  - {protocol: SCTP}\negress:\n- {}\n");
    assert_eq!(
        r.subject,
        Subject::Endpoints(sel(vec![is("k8s:app", "web"), is(NS, "team")]))
    );
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: true,
            egress: true
        }
    );
    let Peers::Selectors(s) = &r.allow.ingress[0].peers else {
        panic!()
    };
    let ep = |reqs| PeerSelector::Endpoints(sel(reqs));
    for want in [
        ep(vec![is("k8s:role", "lb"), is(NS, "team")]),
        ep(vec![
            is("k8s:io.cilium.k8s.namespace.labels.team", "a"),
            is("k8s:role", "mon"),
        ]),
        ep(vec![exists(NS)]),
        PeerSelector::Cidr(CidrSelector {
            cidr: "172.17.0.0/16".parse().unwrap(),
            except: vec!["172.17.1.0/24".parse().unwrap()],
        }),
    ] {
        assert!(s.contains(&want), "{want:?} not in {s:?}");
    }
    assert_eq!(s.len(), 4);
    let pp = &r.allow.ingress[0].ports[0].ports;
    let p = |port, end_port, protocol| PortProtocol {
        port,
        end_port,
        protocol,
    };
    assert_eq!(
        pp,
        &vec![
            p(Port::Number(80), None, Protocol::Tcp),
            p(Port::Named("dns".into()), None, Protocol::Udp),
            p(Port::Number(8000), Some(9000), Protocol::Tcp),
            p(Port::Any, None, Protocol::Sctp),
        ]
    );
    // An egress rule with no `to` and no `ports` allows everything.
    assert_eq!(r.allow.egress[0].peers, Peers::All);
    assert!(r.allow.egress[0].ports.is_empty());
}

#[test]
fn network_policy_types_default() {
    // No policyTypes, no egress: ingress only (deny all ingress with no rules).
    let r = knp("podSelector: {}\n");
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: true,
            egress: false
        }
    );
    assert!(r.allow.ingress.is_empty());
    // No policyTypes, egress rules present: both.
    let r = knp("podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]\n");
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: true,
            egress: true
        }
    );
    // No policyTypes, `egress: []`: ingress only, as the API server defaults it.
    let r = knp("podSelector: {}\negress: []\n");
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: true,
            egress: false
        }
    );
    // Egress only: ingress rules are not applied.
    let r = knp("podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]\n");
    assert_eq!(
        r.default_deny,
        PerDir {
            ingress: false,
            egress: true
        }
    );
    assert!(r.allow.ingress.is_empty());
    // `from: []` selects every source.
    let r = knp("podSelector: {}\ningress: [{from: [], ports: [{port: 443}]}]\n");
    assert_eq!(r.allow.ingress[0].peers, Peers::All);
}

#[test]
fn several_documents_and_kinds() {
    let p = parse("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {podSelector: {}}\n---\n---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: b, labels: {x: y}, annotations: {k: v}, uid: '1', resourceVersion: '2', generation: 3, creationTimestamp: null}\nspec: {endpointSelector: {}, ingress: [{}]}\nstatus: {anything: goes}\n");
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].display_name(), "default/a");
    assert_eq!(p[0].span, Span::new(2, 1));
    assert_eq!(p[1].display_name(), "b");
    assert_eq!(p[1].namespace, None);
    assert_eq!(p[1].span, Span::new(8, 1));
}

#[test]
fn valid_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let p = parse_policy_file(&path).unwrap_or_else(|d| {
            panic!(
                "{}:\n{}",
                path.display(),
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(!p.is_empty(), "{}", path.display());
        n += 1;
    }
    assert!(n >= 3, "only {n} valid fixtures");
}

#[test]
fn everything_file() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/valid/everything.yaml");
    let p = parse_policy_file(&path).unwrap();
    assert_eq!(p.len(), 3);
    let web = &p[0];
    assert_eq!(web.display_name(), "shop/web");
    let r = &web.rules[0];
    assert_eq!(r.description.as_deref(), Some("frontend"));
    assert_eq!(r.allow.egress.len(), 3);
    assert!(matches!(r.allow.egress[0].peers, Peers::Fqdns(_)));
    assert!(matches!(
        r.allow.egress[1].ports[0].l7,
        Some(L7Rules::Dns(_))
    ));
    assert_eq!(r.deny.egress.len(), 1);
    assert_eq!(p[1].kind, PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(p[2].kind, PolicyKind::NetworkPolicy);
}

#[test]
fn kubectl_list_output() {
    let p = parse("apiVersion: v1\nkind: List\nmetadata: {resourceVersion: ''}\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n  metadata: {name: a, namespace: x}\n  spec: {endpointSelector: {}, ingress: [{}]}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: b, namespace: y}\n  spec: {podSelector: {}}\n");
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].display_name(), "x/a");
    assert_eq!(p[1].display_name(), "y/b");
    assert_eq!(p[1].span, Span::new(9, 3));
    let e = parse_policies(
        "l.yaml",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n",
    )
    .unwrap_err();
    assert_eq!(e[0].to_string(), "l.yaml:5:9: items[0].kind: kind Service is not a policy kind (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy)");
}

#[test]
fn empty_port_entries_allow_nothing() {
    // `toPorts: [{}]` names no port: it must not become "every port".
    let r = cnp("endpointSelector: {}\negress:\n- toEntities: [world]\n  toPorts: [{}]\n- toEntities: [world]\n  toPorts: [{}, {ports: [{port: '443', protocol: TCP}]}]\n");
    assert_eq!(r.allow.egress[0].peers, Peers::Selectors(vec![]));
    assert!(r.allow.egress[0].ports.is_empty());
    assert_eq!(r.allow.egress[1].ports.len(), 1);
    assert_eq!(
        r.allow.egress[1].peers,
        Peers::Selectors(vec![PeerSelector::Entity(Entity::World)])
    );
    // The same for ICMP rules without types.
    let r = cnp("endpointSelector: {}\negress:\n- toEntities: [world]\n  icmps: [{fields: []}]\n");
    assert_eq!(r.allow.egress[0].peers, Peers::Selectors(vec![]));
}

#[test]
fn requires_per_direction_and_section() {
    let r = cnp("endpointSelector: {}\ningress:\n- fromRequires: [{matchLabels: {env: prod}}]\n- fromEndpoints: [{matchLabels: {app: a}}]\ningressDeny:\n- fromRequires: [{matchLabels: {reserved:host: ''}}]\negress:\n- toRequires: [{matchExpressions: [{key: k8s:io.kubernetes.pod.namespace, operator: Exists}]}]\n");
    // Scoped like peer selectors: the namespace of the policy is required too (also for a
    // selector naming a reserved label), unless the selector names the namespace itself.
    let ns = is("k8s:io.kubernetes.pod.namespace", "team");
    let mut prod = vec![is("env", "prod"), ns.clone()];
    prod.sort();
    assert_eq!(
        r.requires.ingress.allow,
        vec![LabelSelector { requirements: prod }]
    );
    let mut host = vec![is("reserved:host", ""), ns];
    host.sort();
    assert_eq!(
        r.requires.ingress.deny,
        vec![LabelSelector { requirements: host }]
    );
    assert_eq!(
        r.requires.egress.allow,
        vec![LabelSelector {
            requirements: vec![Requirement {
                key: key("k8s:io.kubernetes.pod.namespace"),
                op: Operator::Exists
            }]
        }]
    );
    assert!(r.requires.egress.deny.is_empty());
    // A rule with only fromRequires grants nothing by itself but enforces the direction.
    assert_eq!(r.allow.ingress[0].peers, Peers::Selectors(vec![]));
    assert!(r.default_deny.ingress);

    // Rule lists are not scoped.
    let rl = parse(
        "- endpointSelector: {}\n  ingress:\n  - fromRequires: [{matchLabels: {env: prod}}]\n",
    );
    assert_eq!(
        rl[0].rules[0].requires.ingress.allow,
        vec![LabelSelector {
            requirements: vec![is("env", "prod")]
        }]
    );
}
