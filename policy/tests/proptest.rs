//! Property tests: random policies, endpoints, learned names and flows. The engine's map-state
//! lookup (audit off) must agree with the reference evaluator on every verdict — allow, deny
//! rule, default deny, the proxy a flow is redirected to and whether that proxy must allow
//! everything, and which names the DNS proxy may resolve through each server — and
//! `policy trace` must report the map state's verdict; building the engine step by
//! step (endpoints arriving, leaving and changing labels, policy sources changing, coming and
//! going, FQDN identities appearing and going)
//! must end in the map state of a from-scratch computation, with the emitted diffs replaying
//! to exactly that state. Failures print the shrunk case as a readable policy listing.

#[path = "proptest_gen/mod.rs"]
mod gen;
#[path = "semantics_harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::net::IpAddr;

use harness::{Flow, PeerSpec, Setup, PROXY_PORTS};
use policy::engine::{Changes, Engine};
use policy::fqdn::DnsName;
use policy::identity::IdentityAllocator;
use policy::labels::{Label, LabelSet};
use policy::mapstate::{MapState, PortKey};
use policy::model::{Direction, Endpoint, Protocol};
use proptest::prelude::*;

/// `PROPTEST_CASES` overrides the number of cases (for longer runs than CI's).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every peer a flow is probed with: each endpoint (the host too), reserved identities that
/// are not local endpoints, and the world addresses.
fn peers(endpoints: &[Endpoint]) -> Vec<PeerSpec> {
    let mut v: Vec<PeerSpec> = endpoints
        .iter()
        .map(|e| PeerSpec::Endpoint(e.name.clone()))
        .collect();
    v.push(PeerSpec::Reserved("remote-node".into()));
    v.push(PeerSpec::Reserved("health".into()));
    v.push(PeerSpec::Reserved("init".into()));
    v.push(PeerSpec::Reserved("kube-apiserver".into()));
    v.extend(
        gen::WORLD_IPS
            .iter()
            .map(|ip| PeerSpec::World(ip.parse().unwrap())),
    );
    v
}

fn describe(setup: &Setup) -> String {
    let learned: Vec<String> = setup
        .learned
        .iter()
        .map(|(n, ip)| format!("{n}→{ip}"))
        .collect();
    format!(
        "{}endpoints:\n{}learned: [{}]",
        gen::show_policies(&setup.policies),
        gen::show_endpoints(&setup.endpoints),
        learned.join(", ")
    )
}

/// All disagreements between the reference and the map state for one setup.
fn disagreements(setup: &Setup) -> Vec<String> {
    let mut out = Vec::new();
    let peers = peers(&setup.endpoints);
    for ep in &setup.endpoints {
        for direction in [Direction::Ingress, Direction::Egress] {
            for peer in &peers {
                for &(protocol, port) in gen::PROBES {
                    let flow = Flow {
                        endpoint: ep.name.clone(),
                        direction,
                        peer: peer.clone(),
                        protocol,
                        port,
                    };
                    let r = setup.reference_name(&flow);
                    let e = setup.engine_name(&flow);
                    let t = setup.trace_name(&flow);
                    if t != e.strip_suffix("+all").unwrap_or(&e) {
                        out.push(format!("{flow}: policy trace says {t}, map state {e}"));
                    }
                    if r != e {
                        let ms = setup.engine.map_state(ep.id).expect("map state");
                        let id = setup.peer_identity(peer);
                        let l = ms.lookup(id, direction, protocol.number(), port);
                        out.push(format!(
                            "{flow}: reference {r} engine {e} (peer identity {id}, entry {:?})",
                            l.key
                        ));
                    }
                }
            }
        }
        // The DNS proxy's decision for every server and name.
        for peer in &peers {
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                let flow = Flow {
                    endpoint: ep.name.clone(),
                    direction: Direction::Egress,
                    peer: peer.clone(),
                    protocol,
                    port: 53,
                };
                let id = setup.peer_identity(peer);
                let verdict = setup
                    .engine
                    .dns_rules_for(ep.id, id, 53, protocol)
                    .expect("endpoint known");
                for n in gen::QUERY_NAMES {
                    let name = DnsName::new(n);
                    let r = setup.reference_dns(&flow, &name);
                    let e = verdict.allows(&name);
                    if r != e {
                        out.push(format!(
                            "{flow}: DNS {n}: reference allows={r}, engine allows={e} ({verdict:?})"
                        ));
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(128),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn map_state_lookup_agrees_with_reference(
        policies in gen::policies(),
        endpoints in gen::endpoints(),
        learned in gen::learned(),
    ) {
        let setup = Setup::new(policies, endpoints, learned);
        let bad = disagreements(&setup);
        prop_assert!(
            bad.is_empty(),
            "{} disagreements, first ones:\n{}\n--- case ---\n{}",
            bad.len(),
            bad.iter().take(8).cloned().collect::<Vec<_>>().join("\n"),
            describe(&setup)
        );
    }
}

/// A map state with identities replaced by their labels, so engines that numbered identities
/// in a different order can be compared.
type Canonical = BTreeMap<(Direction, Vec<String>, PortKey), (bool, u16)>;

fn canonical(engine: &Engine, ms: &MapState) -> Canonical {
    ms.entries()
        .into_iter()
        .map(|(k, e)| {
            let labels = if k.identity == 0 {
                vec!["<any>".to_string()]
            } else {
                engine
                    .identities()
                    .get(k.identity)
                    .map(|i| i.labels.labels().iter().map(|l| l.to_string()).collect())
                    .unwrap_or_else(|| vec![format!("<unknown identity {}>", k.identity)])
            };
            ((k.direction, labels, k.port_key()), (e.deny, e.proxy_port))
        })
        .collect()
}

/// The incremental engine and the datapath's copy of its maps, kept by applying every diff.
struct Incremental {
    engine: Engine,
    shadow: BTreeMap<u16, MapState>,
    learned: Vec<(DnsName, IpAddr)>,
    /// Broken diff promises seen so far.
    violations: Vec<String>,
}

impl Incremental {
    /// Applies the map diffs of `changes` to the datapath's copy, checking the promises the
    /// engine makes about them: no key both upserted and deleted, no upsert that changes
    /// nothing, no delete of an absent key.
    fn apply(&mut self, changes: Changes) {
        for (ep, diff) in changes.maps {
            let shadow = self.shadow.entry(ep).or_default();
            for k in &diff.deletes {
                if shadow.get(k).is_none() {
                    self.violations
                        .push(format!("endpoint {ep}: delete of absent key {k:?}"));
                }
                if diff.adds.iter().any(|(a, _)| a == k) {
                    self.violations.push(format!(
                        "endpoint {ep}: key {k:?} both upserted and deleted"
                    ));
                }
            }
            for (k, e) in &diff.adds {
                if shadow.get(k).is_some_and(|old| old == e) {
                    self.violations
                        .push(format!("endpoint {ep}: no-op upsert of {k:?}"));
                }
            }
            shadow.apply(&diff);
        }
    }

    /// The name manager's job for one learned (name, ip), as the harness's `Setup::learn`.
    fn learn(&mut self, name: DnsName, ip: IpAddr) {
        self.learned.push((name, ip));
        for c in harness::learn_into(&mut self.engine, &self.learned, ip) {
            self.apply(c);
        }
    }

    fn check_shadow(&self, step: &str) -> Result<(), String> {
        if !self.violations.is_empty() {
            return Err(format!("after {step}: {}", self.violations.join("; ")));
        }
        for ep in self.engine.endpoints() {
            let real = self.engine.map_state(ep.id).cloned().unwrap_or_default();
            let shadow = self.shadow.get(&ep.id).cloned().unwrap_or_default();
            if real != shadow {
                return Err(format!(
                    "after {step}: diffs replayed for {} give {} entries, the map state has {}\nreplayed: {:?}\nreal: {:?}",
                    ep.name,
                    shadow.len(),
                    real.len(),
                    shadow.entries(),
                    real.entries()
                ));
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(64),
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    })]

    #[test]
    fn incremental_updates_end_in_the_from_scratch_state(
        first in gen::policies(),
        second in gen::policies(),
        other in gen::policies(),
        transient in gen::policies(),
        endpoints in gen::endpoints(),
        learned in gen::learned(),
    ) {
        // From scratch: sources "a" (= second) and "b" (= other), then the learned names.
        let mut scratch = Engine::new(IdentityAllocator::new(), PROXY_PORTS);
        for ep in &endpoints {
            scratch.upsert_endpoint(ep.clone());
        }
        scratch.set_policies("a.yaml", second.clone());
        scratch.set_policies("b.yaml", other.clone());
        let mut scratch = Incremental { engine: scratch, shadow: BTreeMap::new(), learned: vec![], violations: vec![] };
        for (n, ip) in &learned {
            scratch.learn(n.clone(), *ip);
        }

        // Step by step: policy "a" starts as `first`, endpoints arrive one by one (the host
        // last), "a" changes to `second`, "b" arrives, names are learned; an endpoint leaves
        // and comes back.
        let mut inc = Incremental {
            engine: Engine::new(IdentityAllocator::new(), PROXY_PORTS),
            shadow: BTreeMap::new(),
            learned: vec![],
            violations: vec![],
        };
        let c = inc.engine.set_policies("a.yaml", first.clone());
        inc.apply(c);
        for ep in &endpoints {
            let c = inc.engine.upsert_endpoint(ep.clone());
            inc.apply(c);
            inc.check_shadow(&format!("endpoint {} added", ep.name)).map_err(TestCaseError::fail)?;
        }
        let c = inc.engine.set_policies("a.yaml", second.clone());
        inc.apply(c);
        inc.check_shadow("policy source a changed").map_err(TestCaseError::fail)?;
        let c = inc.engine.set_policies("b.yaml", other.clone());
        inc.apply(c);
        inc.check_shadow("policy source b added").map_err(TestCaseError::fail)?;
        for (n, ip) in &learned {
            inc.learn(n.clone(), *ip);
            inc.check_shadow(&format!("{n} → {ip} learned")).map_err(TestCaseError::fail)?;
        }
        let leaving = endpoints[0].clone();
        let c = inc.engine.remove_endpoint(leaving.id);
        inc.apply(c);
        inc.shadow.remove(&leaving.id);
        inc.check_shadow("endpoint removed").map_err(TestCaseError::fail)?;
        let c = inc.engine.upsert_endpoint(leaving.clone());
        inc.apply(c);
        inc.check_shadow("endpoint re-added").map_err(TestCaseError::fail)?;

        // An endpoint changes labels and changes back.
        let mut relabelled = endpoints[endpoints.len() - 2].clone();
        let original = relabelled.clone();
        relabelled.labels = LabelSet::new(
            relabelled
                .labels
                .labels()
                .iter()
                .filter(|l| l.key != "app")
                .cloned()
                .chain([Label::k8s("app", "relabelled")])
                .collect(),
        );
        let c = inc.engine.upsert_endpoint(relabelled);
        inc.apply(c);
        inc.check_shadow("endpoint relabelled").map_err(TestCaseError::fail)?;
        let c = inc.engine.upsert_endpoint(original);
        inc.apply(c);
        inc.check_shadow("endpoint label restored").map_err(TestCaseError::fail)?;

        // A third source comes and goes.
        let c = inc.engine.set_policies("c.yaml", transient.clone());
        inc.apply(c);
        inc.check_shadow("policy source c added").map_err(TestCaseError::fail)?;
        let c = inc.engine.set_policies("c.yaml", vec![]);
        inc.apply(c);
        inc.check_shadow("policy source c removed").map_err(TestCaseError::fail)?;

        // An address learned under an extra selector set, then forgotten.
        let extra_ip: IpAddr = "203.0.113.99".parse().unwrap();
        let selectors: Vec<_> = inc.engine.fqdn_selectors().into_iter().take(1).collect();
        if !selectors.is_empty() {
            let labels = inc.engine.fqdn_identity_labels(&selectors, extra_ip);
            let (id, c) = inc.engine.upsert_identity(labels);
            inc.apply(c);
            let c = inc.engine.upsert_prefix(ipnet::IpNet::from(extra_ip), id);
            inc.apply(c);
            inc.check_shadow("extra address learned").map_err(TestCaseError::fail)?;
            let c = inc.engine.delete_prefix(ipnet::IpNet::from(extra_ip));
            inc.apply(c);
            let c = inc.engine.release_identity(id);
            inc.apply(c);
            inc.check_shadow("extra address forgotten").map_err(TestCaseError::fail)?;
        }

        let mut policies = second.clone();
        policies.extend(other.clone());
        let listing = format!(
            "{}endpoints:\n{}learned: {:?}",
            gen::show_policies(&policies),
            gen::show_endpoints(&endpoints),
            learned
        );
        for ep in &endpoints {
            let want = canonical(&scratch.engine, scratch.engine.map_state(ep.id).expect("scratch map"));
            let got = canonical(&inc.engine, inc.engine.map_state(ep.id).expect("incremental map"));
            if want != got {
                let missing: Vec<_> = want.iter().filter(|(k, v)| got.get(*k) != Some(*v)).take(6).collect();
                let extra: Vec<_> = got.iter().filter(|(k, v)| want.get(*k) != Some(*v)).take(6).collect();
                return Err(TestCaseError::fail(format!(
                    "endpoint {}: incremental map state differs from scratch\nmissing/changed: {missing:?}\nextra/changed: {extra:?}\n(first policies:\n{})\n--- final case ---\n{listing}",
                    ep.name,
                    gen::show_policies(&first),
                )));
            }
        }
    }
}
