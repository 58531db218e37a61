//! The agent's L7 proxies: the HTTP (HTTP/1.1, HTTP/2, gRPC) and Kafka proxies of the `l7`
//! crate, fed with the policy engine's L7 rules, reporting to `monitor --type l7` and to the
//! metrics.
//!
//! Both proxies always run (whether or not a policy has L7 rules today): their ports are
//! known before the first policy is applied, so a policy map entry that demands a proxy never
//! carries port 0, and a policy file that gains HTTP rules while the agent runs needs no new
//! listener. With the eBPF datapath they listen transparently on `0.0.0.0:PORT` and
//! `[::]:PORT` (`IP_TRANSPARENT`; the programs hand them flows with `bpf_sk_assign`) and mark
//! their upstream connections with the proxy out-mark so they are not steered again. Without
//! it nothing steers flows to them; they listen on 127.0.0.1 so the ports shown in `status`
//! and in the policy maps are real, and a connection made straight to them is refused by the
//! proxy (it has no other destination).
//!
//! Rules: for a flow the endpoint is the one owning the source address (egress; else the one
//! owning the destination address: ingress), the remote identity is the ipcache's identity of
//! the other address, and the engine's `l7_policy` gives the rules of that (endpoint,
//! direction, identity, port). They are compiled on first use and kept in a snapshot that is
//! valid until the agent hands its next change to the datapath (any change may move an IP to
//! another identity or change a map entry) or the policy revision changes (new rule contents
//! on unchanged entries); the next request after that compiles again, so a new policy applies
//! to the next request of an open connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use arc_swap::ArcSwap;
use l7::{
    ConnectionWorkers, EventSink, FlowKey, HttpPolicy, HttpProxyConfig, HttpProxyService,
    KafkaPolicy, KafkaProxyConfig, KafkaProxyService, L7Event, L7EventKind, L7PolicySource,
    L7Stats, L7Verdict, ProxyMode, Redirect, SecretDir,
};
use policy::mapstate::ProxyPorts;
use policy::model::{Direction, L7Kind, L7Rules, Protocol};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::events::Event;
use super::metrics::Exposition;
use super::Agent;
use crate::config::L7Config;

/// Compiled rule sets kept per snapshot; beyond this, lookups compile without keeping.
const MAX_CACHED: usize = 65_536;

/// Events a slow `monitor` may lag behind before it loses some.
const EVENT_BUFFER: usize = 4096;

/// The proxies' listeners, bound before the agent's state exists so that their ports go into
/// the very first policy map entries.
pub struct L7Listeners {
    http: Vec<TcpListener>,
    kafka: Vec<TcpListener>,
    transparent: bool,
    http_port: u16,
    kafka_port: u16,
    denied_message: String,
    secrets_dir: PathBuf,
}

/// Binds one listener per address family on one port: the first family picks the port when
/// `port` is 0, the second takes the same one.
fn bind_family_pair(
    what: &str,
    port: u16,
    transparent: bool,
) -> anyhow::Result<(Vec<TcpListener>, u16)> {
    if !transparent {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let l = l7::net::bind_listener(addr, false)
            .with_context(|| format!("{what} proxy: cannot listen on {addr}"))?;
        let port = l.local_addr()?.port();
        return Ok((vec![l], port));
    }
    let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    let l4 = l7::net::bind_listener(v4, true).with_context(|| {
        format!("{what} proxy: cannot listen transparently on {v4} (needs CAP_NET_ADMIN)")
    })?;
    let port = l4.local_addr()?.port();
    let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
    let mut out = vec![l4];
    match l7::net::bind_listener(v6, true) {
        Ok(l) => out.push(l),
        // A host without IPv6 still gets IPv4 enforcement.
        Err(e) => tracing::warn!("{what} proxy: no IPv6 listener on {v6}: {e}"),
    }
    Ok((out, port))
}

impl L7Listeners {
    /// `transparent`: the eBPF datapath steers flows to the proxies.
    pub fn bind(cfg: &L7Config, transparent: bool) -> anyhow::Result<L7Listeners> {
        let (http, http_port) = bind_family_pair("HTTP", cfg.http_port, transparent)?;
        let (kafka, kafka_port) = bind_family_pair("Kafka", cfg.kafka_port, transparent)?;
        Ok(L7Listeners {
            http,
            kafka,
            transparent,
            http_port,
            kafka_port,
            denied_message: cfg.denied_message.clone(),
            secrets_dir: cfg.secrets_dir.clone(),
        })
    }

    /// `ports` with the HTTP and Kafka proxy ports filled in.
    pub fn proxy_ports(&self, ports: ProxyPorts) -> ProxyPorts {
        ProxyPorts {
            http: self.http_port,
            kafka: self.kafka_port,
            ..ports
        }
    }

    /// Starts serving: the accept loops, and the task that turns proxy events into monitor
    /// events. `out_mark` goes on upstream connections in transparent mode.
    pub fn start(self, agent: &Arc<Agent>, out_mark: u32) -> Vec<JoinHandle<()>> {
        let secrets = self.secrets_dir.clone();
        let source = Arc::new(AgentL7Source::new(agent.clone(), SecretDir::new(&secrets)));
        let sink = EventSink::new(EVENT_BUFFER);
        let _ = agent.l7_stats.set(sink.stats().clone());
        let mode = ProxyMode::Transparent {
            mark: self.transparent.then_some(out_mark),
        };
        let mut tasks = Vec::new();
        let mut http_cfg = HttpProxyConfig::new(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), self.http_port),
            mode,
        );
        http_cfg.denied_message = self.denied_message.clone();
        // HTTP connections are served by single-threaded runtimes (one per two CPUs, see
        // ConnectionWorkers::for_node), each taking the next connection when it serves the
        // fewest: a connection and its upstream stay on one thread (no cross-thread
        // wake-ups per request), and the load spreads evenly even though the datapath
        // steers every flow to one listening socket.
        let http_spawn = if self.http.is_empty() {
            Spawn::Here
        } else {
            match ConnectionWorkers::for_node("fqdnwall-http") {
                Ok(w) => Spawn::Workers(Arc::new(w)),
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP proxy: no worker threads; serving on the main runtime");
                    Spawn::Here
                }
            }
        };
        for l in self.http {
            let mut cfg = http_cfg.clone();
            cfg.listen = l.local_addr().unwrap_or(cfg.listen);
            let svc = HttpProxyService::new(cfg, source.clone(), sink.clone());
            let spawn = http_spawn.clone();
            tasks.push(tokio::spawn(accept_loop(
                l,
                "http",
                spawn,
                move |s, src, dst| {
                    let svc = svc.clone();
                    async move { svc.serve(s, src, dst).await }
                },
            )));
        }
        for l in self.kafka {
            let addr = l.local_addr().unwrap_or(SocketAddr::new(
                Ipv4Addr::UNSPECIFIED.into(),
                self.kafka_port,
            ));
            let svc = KafkaProxyService::new(
                KafkaProxyConfig::new(addr, mode),
                source.clone(),
                sink.clone(),
            );
            tasks.push(tokio::spawn(accept_loop(
                l,
                "kafka",
                Spawn::Here,
                move |s, src, dst| {
                    let svc = svc.clone();
                    async move { svc.serve(s, src, dst).await }
                },
            )));
        }
        tasks.push(tokio::spawn(event_loop(agent.clone(), sink)));
        tracing::info!(
            http = self.http_port,
            kafka = self.kafka_port,
            transparent = self.transparent,
            secrets = %secrets.display(),
            "L7 proxies listening"
        );
        tasks
    }
}

/// Where an accepted connection is served.
#[derive(Clone)]
enum Spawn {
    /// A task on the accepting runtime.
    Here,
    /// The least busy of the worker threads.
    Workers(Arc<ConnectionWorkers>),
}

/// Accepts connections; each is served towards its original destination, which for a flow
/// steered to a transparent socket is the socket's local address.
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, spawn: Spawn, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "{what} proxy: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let dst = match l7::net::original_dst(&stream) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "{what} proxy: no original destination");
                continue;
            }
        };
        // A connection made straight to the proxy's port (on any local address) has no
        // other destination: forwarding it would connect the proxy to itself, forever.
        if Some(dst.port()) == listener.local_addr().ok().map(|a| a.port()) {
            tracing::debug!(%src, "{what} proxy: refusing a connection made to the proxy itself");
            continue;
        }
        let (src, dst) = (unmap(src), unmap(dst));
        match &spawn {
            Spawn::Here => {
                tokio::spawn(serve(stream, src, dst));
            }
            Spawn::Workers(workers) => {
                let serve = serve.clone();
                if let Err(e) = workers.spawn(stream, move |s| serve(s, src, dst)) {
                    tracing::warn!(%src, error = %e, "{what} proxy: connection not handed to a worker");
                }
            }
        }
    }
}

/// IPv4 clients of an IPv6 socket appear as `::ffff:a.b.c.d`; endpoints and the ipcache
/// know them as IPv4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// A flow as its rules are selected: (source IP, destination IP, destination port).
type FlowSel = (IpAddr, IpAddr, u16);

/// What a compiled rule set depends on: the agent's last change handed to the datapath (map
/// entries, the ipcache) and the policy revision (rule contents, which may change without any
/// map entry changing).
type Generation = (u64, u64);

/// Rule sets compiled for one `generation`.
struct Snapshot<P> {
    generation: Generation,
    rules: RwLock<HashMap<FlowSel, Option<Redirect<P>>>>,
}

impl<P> Snapshot<P> {
    fn new(generation: Generation) -> Self {
        Snapshot {
            generation,
            rules: RwLock::new(HashMap::new()),
        }
    }
}

/// The proxies' view of the policy engine.
pub struct AgentL7Source {
    agent: Arc<Agent>,
    secrets: SecretDir,
    http: ArcSwap<Snapshot<HttpPolicy>>,
    kafka: ArcSwap<Snapshot<KafkaPolicy>>,
}

/// What the engine says about one flow.
struct Resolved {
    endpoint_id: u16,
    endpoint: Arc<str>,
    remote_identity: u32,
    /// The L7 rules of the flow's kind, flattened over every rule that allows it; `None`:
    /// every request is allowed (an allow without L7 rules also covers the flow, or a rule
    /// with an empty list).
    rules: Option<Vec<Arc<L7Rules>>>,
}

impl AgentL7Source {
    pub fn new(agent: Arc<Agent>, secrets: SecretDir) -> AgentL7Source {
        AgentL7Source {
            agent,
            secrets,
            http: ArcSwap::from_pointee(Snapshot::new((u64::MAX, u64::MAX))),
            kafka: ArcSwap::from_pointee(Snapshot::new((u64::MAX, u64::MAX))),
        }
    }

    /// Resolves a flow under the state lock; also returns the change generation the answer
    /// belongs to.
    fn resolve(&self, flow: &FlowKey, kind: L7Kind) -> (Generation, Option<Resolved>) {
        let st = self.agent.lock();
        let generation = (self.agent.issued(), st.revision);
        let (src, dst) = (flow.src.ip(), flow.dst.ip());
        let (ep, dir, remote) = if let Some(&ep) = st.by_ip.get(&src) {
            (ep, Direction::Egress, dst)
        } else if let Some(&ep) = st.by_ip.get(&dst) {
            (ep, Direction::Ingress, src)
        } else {
            return (generation, None);
        };
        let identity = st.engine.ipcache().identity_of(remote);
        let Some(pol) =
            st.engine
                .l7_policy(ep, dir, identity, Protocol::Tcp.number(), flow.dst.port())
        else {
            return (generation, None);
        };
        if pol.kind != kind {
            return (generation, None);
        }
        let name: Arc<str> = st
            .engine
            .endpoint(ep)
            .map(|e| Arc::from(e.name.as_str()))
            .unwrap_or_else(|| Arc::from(ep.to_string()));
        let rules = if pol.allow_all {
            None
        } else {
            Some(pol.rules.iter().map(|(r, _)| r.clone()).collect())
        };
        (
            generation,
            Some(Resolved {
                endpoint_id: ep,
                endpoint: name,
                remote_identity: identity,
                rules,
            }),
        )
    }

    /// The cached answer for `flow`, or a fresh one (kept when the snapshot is current).
    fn lookup<P>(
        &self,
        snap: &ArcSwap<Snapshot<P>>,
        flow: &FlowKey,
        kind: L7Kind,
        compile: impl FnOnce(Option<&[Arc<L7Rules>]>) -> Option<P>,
    ) -> Option<Redirect<P>> {
        let key = (flow.src.ip(), flow.dst.ip(), flow.dst.port());
        let current = (
            self.agent.issued(),
            self.agent
                .policy_revision
                .load(std::sync::atomic::Ordering::SeqCst),
        );
        let s = snap.load();
        if s.generation == current {
            if let Some(hit) = s.rules.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
                return hit.clone();
            }
        }
        let (generation, resolved) = self.resolve(flow, kind);
        let answer = resolved.and_then(|r| {
            let policy = compile(r.rules.as_deref())?;
            Some(Redirect {
                endpoint_id: r.endpoint_id,
                endpoint: r.endpoint,
                remote_identity: r.remote_identity,
                policy: Arc::new(policy),
            })
        });
        // Keep it only in the snapshot of the generation it was computed for.
        let s = snap.rcu(|old| {
            if old.generation == generation {
                old.clone()
            } else {
                Arc::new(Snapshot::new(generation))
            }
        });
        let s = if s.generation == generation {
            s
        } else {
            snap.load_full()
        };
        if s.generation == generation {
            let mut m = s.rules.write().unwrap_or_else(|e| e.into_inner());
            if m.len() < MAX_CACHED {
                m.insert(key, answer.clone());
            }
        }
        answer
    }
}

impl L7PolicySource for AgentL7Source {
    fn http(&self, flow: &FlowKey) -> Option<Redirect<HttpPolicy>> {
        self.lookup(&self.http, flow, L7Kind::Http, |rules| {
            let Some(rules) = rules else {
                return Some(HttpPolicy::allow_all());
            };
            let mut flat = Vec::new();
            for r in rules {
                if let L7Rules::Http(v) = &**r {
                    // One allowing rule with an empty list allows every request.
                    if v.is_empty() {
                        return Some(HttpPolicy::allow_all());
                    }
                    flat.extend(v.iter().cloned());
                }
            }
            match HttpPolicy::compile(&flat, &self.secrets) {
                Ok(p) => {
                    for w in p.warnings() {
                        tracing::warn!(flow = ?flow, "L7 HTTP rules: {w}");
                    }
                    Some(p)
                }
                Err(e) => {
                    // Fail closed: the proxy denies every request of the flow.
                    tracing::error!(flow = ?flow, "L7 HTTP rules do not compile: {e}");
                    None
                }
            }
        })
    }

    fn kafka(&self, flow: &FlowKey) -> Option<Redirect<KafkaPolicy>> {
        self.lookup(&self.kafka, flow, L7Kind::Kafka, |rules| {
            let Some(rules) = rules else {
                return Some(KafkaPolicy::allow_all());
            };
            let mut flat = Vec::new();
            for r in rules {
                if let L7Rules::Kafka(v) = &**r {
                    if v.is_empty() {
                        return Some(KafkaPolicy::allow_all());
                    }
                    flat.extend(v.iter().cloned());
                }
            }
            match KafkaPolicy::compile(&flat) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(flow = ?flow, "L7 Kafka rules do not compile: {e}");
                    None
                }
            }
        })
    }
}

/// Proxy events → monitor events of type `l7`.
async fn event_loop(agent: Arc<Agent>, sink: EventSink) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = sink.subscribe();
    loop {
        match rx.recv().await {
            Ok(ev) => {
                if agent.events.has_subscribers() {
                    let e = monitor_event(&agent, &ev);
                    agent.events.publish(e);
                }
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!("monitor: {n} L7 events dropped (monitor too slow)");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// One L7 event as `monitor` shows it.
pub fn monitor_event(agent: &Agent, ev: &L7Event) -> Event {
    // Direction and the endpoint's identity from the state: the source owns the endpoint's
    // address on egress.
    let (direction, ep_identity) = match ev.endpoint_id {
        Some(ep) => {
            let st = agent.lock();
            let egress = st.by_ip.get(&ev.src.ip()) == Some(&ep);
            (
                Some(if egress { "egress" } else { "ingress" }),
                st.engine.endpoint_identity(ep),
            )
        }
        None => (None, None),
    };
    let (src_identity, dst_identity) = match direction {
        Some("egress") => (ep_identity, ev.remote_identity),
        Some(_) => (ev.remote_identity, ep_identity),
        None => (None, None),
    };
    let mut extra = serde_json::Map::new();
    extra.insert("l7Protocol".into(), ev.protocol.as_str().into());
    match &ev.kind {
        L7EventKind::Http {
            version,
            method,
            path,
            host,
            status,
            grpc_status,
            header_actions,
        } => {
            extra.insert("httpVersion".into(), (*version).into());
            extra.insert("method".into(), method.clone().into());
            extra.insert("path".into(), path.clone().into());
            extra.insert("host".into(), host.clone().into());
            extra.insert("status".into(), (*status).into());
            if let Some(g) = grpc_status {
                extra.insert("grpcStatus".into(), (*g).into());
            }
            if !header_actions.is_empty() {
                extra.insert("headerActions".into(), header_actions.clone().into());
            }
        }
        L7EventKind::Kafka {
            api_key,
            api_key_name,
            api_version,
            correlation_id,
            client_id,
            topics,
            error_code,
        } => {
            extra.insert("apiKey".into(), (*api_key).into());
            extra.insert("apiKeyName".into(), (*api_key_name).into());
            extra.insert("apiVersion".into(), (*api_version).into());
            extra.insert("correlationId".into(), (*correlation_id).into());
            extra.insert(
                "clientID".into(),
                client_id
                    .clone()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::Null),
            );
            // `topic`: the request's topic; several are joined with commas (all listed in
            // `topics`).
            extra.insert("topic".into(), topics.join(",").into());
            extra.insert("topics".into(), topics.clone().into());
            if let Some(c) = error_code {
                extra.insert("errorCode".into(), (*c).into());
            }
        }
    }
    Event {
        time: fqdn_cache::Timestamp::from_system_time(ev.time).to_rfc3339(),
        kind: "l7",
        endpoint: ev.endpoint.as_deref().map(str::to_string),
        direction,
        src_ip: Some(ev.src.ip().to_string()),
        dst_ip: Some(ev.dst.ip().to_string()),
        dport: Some(ev.dst.port()),
        protocol: Some("TCP"),
        src_identity,
        dst_identity,
        verdict: match ev.verdict {
            L7Verdict::Allowed => "allowed",
            L7Verdict::Denied => "denied",
        },
        extra,
    }
}

/// The proxies' counters in the metrics document.
pub fn render_metrics(stats: &L7Stats, e: &mut Exposition) {
    let protocols = [("http", &stats.http), ("kafka", &stats.kafka)];
    e.header(
        "fqdnwall_l7_requests_total",
        "counter",
        "L7 requests by protocol and verdict.",
    );
    for (p, s) in protocols {
        let c = s.snapshot();
        for (v, n) in [("allowed", c.allowed), ("denied", c.denied)] {
            e.sample(
                "fqdnwall_l7_requests_total",
                &[("protocol", p), ("verdict", v)],
                n as f64,
            );
        }
    }
    type Get = fn(&l7::events::ProtocolCounts) -> u64;
    let counters: [(&str, &str, Get); 3] = [
        (
            "fqdnwall_l7_malformed_requests_total",
            "L7 requests that could not be parsed (HTTP 400, Kafka connection closed).",
            |c| c.malformed,
        ),
        (
            "fqdnwall_l7_upstream_errors_total",
            "Allowed L7 requests whose upstream could not be reached or failed.",
            |c| c.upstream_errors,
        ),
        (
            "fqdnwall_l7_connections_total",
            "Client connections accepted by the L7 proxies.",
            |c| c.connections,
        ),
    ];
    for (name, help, get) in counters {
        e.header(name, "counter", help);
        for (p, s) in protocols {
            e.sample(name, &[("protocol", p)], get(&s.snapshot()) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_clients_are_ipv4() {
        let a: SocketAddr = "[::ffff:10.0.0.2]:4000".parse().unwrap();
        assert_eq!(unmap(a), "10.0.0.2:4000".parse::<SocketAddr>().unwrap());
        let b: SocketAddr = "[fd00::2]:4000".parse().unwrap();
        assert_eq!(unmap(b), b);
    }

    #[test]
    fn metrics_name_every_protocol_and_verdict() {
        let stats = L7Stats::default();
        stats
            .http
            .denied
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let mut e = Exposition::default();
        render_metrics(&stats, &mut e);
        let s = e.finish();
        assert!(s.contains("fqdnwall_l7_requests_total{protocol=\"http\",verdict=\"denied\"} 2\n"));
        assert!(
            s.contains("fqdnwall_l7_requests_total{protocol=\"kafka\",verdict=\"allowed\"} 0\n")
        );
        assert!(s.contains("fqdnwall_l7_connections_total{protocol=\"http\"} 0\n"));
    }
}
