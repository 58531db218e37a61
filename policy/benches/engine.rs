//! Policy engine benchmarks at node scale: 1,000 endpoints × 10,000 rules of mixed label,
//! CIDR, entity, port-range, ICMP, L7 and FQDN selectors, generated deterministically.
//!
//! - `full`: a from-scratch computation (endpoints, FQDN identities, then every policy) — time,
//!   and peak heap measured by a counting global allocator (plus the process's VmHWM);
//! - `incremental`: one new FQDN identity that 100 endpoints' rules select, until its diff is
//!   out (identity + its /32 in the ipcache) — and its ratio to `full`, from the same run;
//! - `verdict`: one flow decided by a map-state lookup vs by the reference evaluator.
//!
//! Besides criterion's own reports, a summary with the ratios is printed as `SUMMARY ...` lines
//! (bench/policy-engine.sh collects them for bench/RESULTS.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ipnet::IpNet;
use policy::engine::Engine;
use policy::error::Span;
use policy::fqdn::{DnsName, FqdnPattern};
use policy::identity::IdentityAllocator;
use policy::labels::{
    Label, LabelKey, LabelSelector, LabelSet, Operator, Requirement, CLUSTER_LABEL, NAMESPACE_LABEL,
};
use policy::mapstate::ProxyPorts;
use policy::model::{
    CidrSelector, Direction, Endpoint, Entity, FqdnSelector, HttpRule, IcmpField, IpFamily,
    L7Rules, PeerRule, PeerSelector, Peers, PerDir, Policy, PolicyKind, Port, PortProtocol,
    PortRule, Protocol, Rule, Subject,
};
use policy::reference::{self, RefFlow, RefPeer, Universe};

// ---- a counting allocator: current and peak live heap bytes ----

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// CPU time (user + system) this thread has used: wall time on a shared, loaded machine
/// includes time spent waiting for a core, CPU time does not.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---- the generated node ----

const ENDPOINTS: usize = 1_000;
const RULES: usize = 10_000;
const RULES_PER_POLICY: usize = 100;
const FQDN_SELECTORS: usize = 500;
/// Endpoints labelled `role=fqdn-client`: the ones the incremental identity concerns.
const FQDN_CLIENTS: usize = 100;
const NEW_NAME: &str = "new.example.com";

const PROXY_PORTS: ProxyPorts = ProxyPorts {
    dns: 10053,
    http: 10080,
    kafka: 10092,
};

fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        requirements: pairs
            .iter()
            .map(|(k, v)| Requirement {
                key: LabelKey::parse(k),
                op: Operator::In(vec![v.clone()]),
            })
            .collect(),
    }
}

fn endpoint_ip(i: usize) -> IpAddr {
    format!("10.{}.{}.{}", 1 + i / 250, i % 250, 10)
        .parse()
        .unwrap()
}

fn endpoints() -> Vec<Endpoint> {
    (0..ENDPOINTS)
        .map(|i| {
            let mut labels = vec![
                Label::k8s(NAMESPACE_LABEL, &format!("ns{}", i % 10)),
                Label::k8s(CLUSTER_LABEL, "default"),
                Label::k8s("app", &format!("app{}", i % 100)),
                Label::k8s("tier", ["front", "back", "batch"][i % 3]),
                Label::k8s("pod", &format!("pod{i}")),
            ];
            if i < FQDN_CLIENTS {
                labels.push(Label::k8s("role", "fqdn-client"));
            }
            let mut named_ports = BTreeMap::new();
            named_ports.insert("http".to_string(), (8080, Protocol::Tcp));
            Endpoint {
                id: 100 + i as u16,
                name: format!("pod{i}"),
                labels: LabelSet::new(labels),
                ips: vec![endpoint_ip(i)],
                named_ports,
                is_host: false,
            }
        })
        .collect()
}

fn tcp(port: u16, end: Option<u16>, l7: Option<L7Rules>) -> PortRule {
    PortRule {
        ports: vec![PortProtocol {
            port: Port::Number(port),
            end_port: end,
            protocol: Protocol::Tcp,
        }],
        l7,
        server_names: vec![],
    }
}

fn peer_rule(peers: Peers, ports: Vec<PortRule>, icmps: Vec<IcmpField>) -> PeerRule {
    PeerRule {
        peers,
        ports,
        icmps,
        span: Span::default(),
    }
}

fn fqdn_pattern(k: usize) -> FqdnSelector {
    FqdnSelector::MatchPattern(
        FqdnPattern::parse(&format!("*.svc{}.example.com", k % FQDN_SELECTORS)).unwrap(),
    )
}

/// Rule `k`: the mix cycles through ten shapes.
fn rule(k: usize) -> Rule {
    let app = |n: usize| ("app", format!("app{}", n % 100));
    let subject = Subject::Endpoints(sel(&[app(k)]));
    let mut allow: PerDir<Vec<PeerRule>> = PerDir::default();
    let mut deny: PerDir<Vec<PeerRule>> = PerDir::default();
    match k % 10 {
        0..=3 => allow.ingress.push(peer_rule(
            Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[
                app(k * 7 + 3),
                ("tier", "front".into()),
            ]))]),
            vec![tcp(80 + (k % 50) as u16, None, None)],
            vec![],
        )),
        4 => allow.egress.push(peer_rule(
            Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[app(k * 13 + 1)]))]),
            vec![tcp(8000, Some(8099), None)],
            vec![],
        )),
        5 => {
            let net: IpNet = format!("172.{}.{}.0/24", 16 + k % 16, (k / 16) % 256)
                .parse()
                .unwrap();
            let hole: IpNet = format!("172.{}.{}.16/28", 16 + k % 16, (k / 16) % 256)
                .parse()
                .unwrap();
            allow.egress.push(peer_rule(
                Peers::Selectors(vec![PeerSelector::Cidr(CidrSelector {
                    cidr: net,
                    except: vec![hole],
                })]),
                vec![tcp(443, None, None)],
                vec![],
            ))
        }
        6 => allow.egress.push(peer_rule(
            Peers::Selectors(vec![PeerSelector::Entity(
                [Entity::World, Entity::Cluster, Entity::Host][k % 3],
            )]),
            vec![PortRule {
                ports: vec![PortProtocol {
                    port: Port::Number(53),
                    end_port: None,
                    protocol: Protocol::Udp,
                }],
                l7: None,
                server_names: vec![],
            }],
            vec![],
        )),
        7 => allow.egress.push(peer_rule(
            Peers::Fqdns(vec![fqdn_pattern(k / 10)]),
            vec![tcp(443, None, None)],
            vec![],
        )),
        8 => deny.ingress.push(peer_rule(
            Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[app(k * 3 + 2)]))]),
            vec![tcp(22, None, None)],
            vec![],
        )),
        _ => {
            allow.ingress.push(peer_rule(
                Peers::Selectors(vec![PeerSelector::Entity(Entity::Cluster)]),
                vec![],
                vec![IcmpField {
                    family: IpFamily::V4,
                    icmp_type: 8,
                }],
            ));
            allow.ingress.push(peer_rule(
                Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[app(k * 11 + 5)]))]),
                vec![
                    tcp(
                        80,
                        None,
                        Some(L7Rules::Http(vec![HttpRule {
                            method: Some("GET".into()),
                            path: Some("/api/.*".into()),
                            ..HttpRule::default()
                        }])),
                    ),
                    PortRule {
                        ports: vec![PortProtocol {
                            port: Port::Named("http".into()),
                            end_port: None,
                            protocol: Protocol::Tcp,
                        }],
                        l7: None,
                        server_names: vec![],
                    },
                ],
                vec![],
            ));
        }
    }
    let has = PerDir {
        ingress: !allow.ingress.is_empty() || !deny.ingress.is_empty(),
        egress: !allow.egress.is_empty() || !deny.egress.is_empty(),
    };
    Rule {
        subject,
        allow,
        deny,
        default_deny: has,
        has_direction: has,
        requires: PerDir::default(),
        description: None,
        span: Span::default(),
    }
}

fn policies() -> Vec<Policy> {
    let mut rules: Vec<Rule> = (0..RULES - 1).map(rule).collect();
    // The rule the incremental case is about: 100 endpoints may reach new.example.com.
    rules.push(Rule {
        subject: Subject::Endpoints(sel(&[("role", "fqdn-client".into())])),
        allow: PerDir {
            ingress: vec![],
            egress: vec![peer_rule(
                Peers::Fqdns(vec![FqdnSelector::MatchName(
                    DnsName::parse_match_name(NEW_NAME).unwrap(),
                )]),
                vec![tcp(443, None, None)],
                vec![],
            )],
        },
        deny: PerDir::default(),
        default_deny: PerDir {
            ingress: false,
            egress: true,
        },
        has_direction: PerDir {
            ingress: false,
            egress: true,
        },
        requires: PerDir::default(),
        description: None,
        span: Span::default(),
    });
    rules
        .chunks(RULES_PER_POLICY)
        .enumerate()
        .map(|(i, chunk)| Policy {
            kind: PolicyKind::CiliumClusterwideNetworkPolicy,
            name: format!("bench-{i}"),
            namespace: None,
            file: Arc::from("bench.yaml"),
            span: Span::default(),
            rules: chunk.to_vec(),
        })
        .collect()
}

fn fqdn_labels(selector: &FqdnSelector) -> LabelSet {
    LabelSet::new(vec![
        Label::reserved("world"),
        Label::new("fqdn", &selector.label_value(), ""),
    ])
}

/// One learned IP per FQDN selector, as the name manager would have them.
fn learned_fqdn_ips() -> Vec<(LabelSet, IpNet)> {
    (0..FQDN_SELECTORS)
        .map(|k| {
            let ip: IpNet = format!("203.0.{}.{}/32", k / 250, 1 + k % 250)
                .parse()
                .unwrap();
            (fqdn_labels(&fqdn_pattern(k)), ip)
        })
        .collect()
}

struct Node {
    endpoints: Vec<Endpoint>,
    policies: Vec<Policy>,
    fqdn: Vec<(LabelSet, IpNet)>,
}

fn node() -> Node {
    Node {
        endpoints: endpoints(),
        policies: policies(),
        fqdn: learned_fqdn_ips(),
    }
}

/// The full computation: everything known, one policy load.
fn full(n: &Node) -> Engine {
    let mut e = Engine::new(IdentityAllocator::new(), PROXY_PORTS);
    for ep in &n.endpoints {
        e.upsert_endpoint(ep.clone());
    }
    for (labels, ip) in &n.fqdn {
        let (id, _) = e.upsert_identity(labels.clone());
        e.upsert_prefix(*ip, id);
    }
    e.set_policies("bench.yaml", n.policies.clone());
    e
}

fn new_identity_labels() -> LabelSet {
    fqdn_labels(&FqdnSelector::MatchName(
        DnsName::parse_match_name(NEW_NAME).unwrap(),
    ))
}

const NEW_IP: &str = "198.18.0.1/32";

/// One incremental step: the identity and its address; returns the number of endpoints
/// whose maps changed (so the diff cannot be optimised away) and undoes it afterwards.
fn incremental_step(e: &mut Engine) -> (Duration, usize, usize) {
    let labels = new_identity_labels();
    let ip: IpNet = NEW_IP.parse().unwrap();
    let t = Instant::now();
    let (id, c1) = e.upsert_identity(labels);
    let c2 = e.upsert_prefix(ip, id);
    let took = t.elapsed();
    let eps = c1.maps.len();
    let entries: usize = c1.maps.iter().map(|(_, d)| d.adds.len()).sum();
    black_box(&c2);
    e.delete_prefix(ip);
    e.release_identity(id);
    (took, eps, entries)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn summary(n: &Node) {
    // Full computation: peak heap above the baseline, three timed runs.
    let hwm_before = vm_hwm_kib();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = Instant::now();
    let engine = full(n);
    let first = t.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let retained = LIVE.load(Ordering::Relaxed) - base;
    let hwm_after = vm_hwm_kib();
    let entries: usize = n
        .endpoints
        .iter()
        .filter_map(|ep| engine.map_state(ep.id))
        .map(|m| m.len())
        .sum();
    drop(engine);
    let mut fulls = vec![first];
    let mut full_cpus = Vec::new();
    for _ in 0..2 {
        let (t, c) = (Instant::now(), thread_cpu());
        black_box(full(n));
        fulls.push(t.elapsed());
        full_cpus.push(thread_cpu() - c);
    }
    let full_med = median(fulls);
    let full_cpu = full_cpus.iter().min().copied().unwrap_or_default();

    // Incremental: 2,000 steps on one engine.
    let mut engine = full(n);
    let mut incs = Vec::new();
    let mut touched = (0, 0);
    let inc_cpu_start = thread_cpu();
    for _ in 0..2_000 {
        let (d, eps, ents) = incremental_step(&mut engine);
        incs.push(d);
        touched = (eps, ents);
    }
    let inc_cpu = (thread_cpu() - inc_cpu_start) / 2_000;
    let inc_med = median(incs.clone());
    incs.sort();
    let inc_p99 = incs[incs.len() * 99 / 100];

    // Verdicts: map-state lookup vs reference evaluator, same flows.
    let flows = verdict_flows(n, &engine);
    let t = Instant::now();
    let rounds = 200_000usize;
    for i in 0..rounds {
        let (ep, id, _, proto, port) = &flows[i % flows.len()];
        black_box(
            engine
                .map_state(*ep)
                .unwrap()
                .lookup(*id, Direction::Ingress, proto.number(), *port)
                .verdict,
        );
    }
    let lookup_ns = t.elapsed().as_nanos() as f64 / rounds as f64;
    let u = Universe {
        policies: &n.policies,
        endpoints: &n.endpoints,
        learned: &[],
    };
    let ref_rounds = 200usize;
    let t = Instant::now();
    for i in 0..ref_rounds {
        let (ep, _, peer, proto, port) = &flows[i % flows.len()];
        let ep = &n.endpoints[usize::from(*ep) - 100];
        black_box(reference::evaluate(
            &u,
            ep,
            &RefFlow {
                direction: Direction::Ingress,
                peer: peer.clone(),
                protocol: *proto,
                port: *port,
            },
        ));
    }
    let ref_ns = t.elapsed().as_nanos() as f64 / ref_rounds as f64;

    println!("SUMMARY scale endpoints={ENDPOINTS} rules={RULES} map_entries={entries}");
    println!(
        "SUMMARY full median={:.3}s cpu={:.3}s runs=3 peak_heap={:.1}MiB retained_heap={:.1}MiB vmhwm_before={:?}KiB vmhwm_after={:?}KiB",
        full_med.as_secs_f64(),
        full_cpu.as_secs_f64(),
        peak as f64 / (1 << 20) as f64,
        retained as f64 / (1 << 20) as f64,
        hwm_before,
        hwm_after
    );
    println!(
        "SUMMARY incremental median={:.1}us p99={:.1}us cpu_per_step_and_undo={:.1}us endpoints_changed={} entries_added={} ratio_full_over_incremental={:.0}",
        inc_med.as_nanos() as f64 / 1e3,
        inc_p99.as_nanos() as f64 / 1e3,
        inc_cpu.as_nanos() as f64 / 1e3,
        touched.0,
        touched.1,
        full_med.as_nanos() as f64 / inc_med.as_nanos().max(1) as f64
    );
    println!(
        "SUMMARY verdict map_lookup={lookup_ns:.1}ns reference={ref_ns:.0}ns ratio_reference_over_lookup={:.0}",
        ref_ns / lookup_ns
    );
}

/// Flows into the first 50 endpoints from other endpoints, on ports the rules use.
fn verdict_flows(n: &Node, e: &Engine) -> Vec<(u16, u32, RefPeer, Protocol, u16)> {
    let mut v = Vec::new();
    for i in 0..50usize {
        let src = &n.endpoints[(i * 37 + 11) % ENDPOINTS];
        let id = e
            .identities()
            .lookup(&src.labels)
            .expect("endpoint identity");
        for port in [80u16, 81, 22, 8080] {
            v.push((
                n.endpoints[i].id,
                id,
                RefPeer {
                    labels: src.labels.clone(),
                    ip: Some(src.ips[0]),
                    in_cluster: true,
                },
                Protocol::Tcp,
                port,
            ));
        }
    }
    v
}

fn benches(c: &mut Criterion) {
    let n = node();
    summary(&n);

    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("full_1000_endpoints_10000_rules", |b| {
        b.iter(|| black_box(full(&n)))
    });
    g.finish();

    let mut engine = full(&n);
    let mut g = c.benchmark_group("policy");
    g.bench_function("incremental_fqdn_identity_100_endpoints", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += incremental_step(&mut engine).0;
            }
            total
        })
    });
    let flows = verdict_flows(&n, &engine);
    let mut i = 0usize;
    g.bench_function("verdict_map_state_lookup", |b| {
        b.iter(|| {
            let (ep, id, _, proto, port) = &flows[i % flows.len()];
            i += 1;
            black_box(
                engine
                    .map_state(*ep)
                    .unwrap()
                    .lookup(*id, Direction::Ingress, proto.number(), *port)
                    .verdict,
            )
        })
    });
    let u = Universe {
        policies: &n.policies,
        endpoints: &n.endpoints,
        learned: &[],
    };
    let mut j = 0usize;
    g.sample_size(10);
    g.bench_function("verdict_reference_evaluator", |b| {
        b.iter(|| {
            let (ep, _, peer, proto, port) = &flows[j % flows.len()];
            j += 1;
            let ep = &n.endpoints[usize::from(*ep) - 100];
            black_box(reference::evaluate(
                &u,
                ep,
                &RefFlow {
                    direction: Direction::Ingress,
                    peer: peer.clone(),
                    protocol: *proto,
                    port: *port,
                },
            ))
        })
    });
    g.finish();
}

criterion_group!(policy_engine, benches);
criterion_main!(policy_engine);
