//! A standalone DNS proxy that allows every query and learns every answer into an in-memory
//! table (name → IPs with expiry), releasing each response once the table holds its IPs.
//! It exercises the whole proxy pipeline without the agent; `bench/dns/run.sh --example`
//! measures it against other forwarders.
//!
//! Usage: allow_all --listen 127.0.0.1:5353 --upstream 127.0.0.1:53 [--listen ...]
//!        [--upstream ...] [--udp-sockets N] [--upstream-sockets N]
//! Stops on SIGINT/SIGTERM and prints its counters and histograms.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dnsproxy::{
    Decision, DnsPolicy, DnsProxy, HoldOutcome, LearnedAnswer, Learner, ProxyConfig, QueryContext,
    Transport,
};
use policy::fqdn::DnsName;

struct AllowAll;

impl DnsPolicy for AllowAll {
    fn check(&self, _: SocketAddr, _: SocketAddr, _: Transport, _: &DnsName) -> Decision {
        Decision::Allow { endpoint_id: 1 }
    }
}

/// name → (ip → expiry), filed under every name of the chain.
#[derive(Default)]
struct Table {
    names: Mutex<HashMap<DnsName, HashMap<IpAddr, Instant>>>,
}

impl Learner for Table {
    fn learn(
        &self,
        ctx: &QueryContext,
        answer: &LearnedAnswer,
    ) -> impl Future<Output = HoldOutcome> + Send + Unpin + 'static {
        let expiry = Instant::now() + Duration::from_secs(u64::from(answer.ttl));
        let mut names = self.names.lock().expect("table lock");
        for name in std::iter::once(&ctx.qname).chain(&answer.chain) {
            let ips = names.entry(name.clone()).or_default();
            for ip in &answer.ips {
                let e = ips.entry(*ip).or_insert(expiry);
                *e = (*e).max(expiry);
            }
        }
        // The table is the datapath here: it holds the IPs as soon as the insert is done.
        std::future::ready(HoldOutcome::Enforceable)
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("allow_all: {msg}\nusage: allow_all --listen ADDR --upstream ADDR [--udp-sockets N] [--upstream-sockets N]");
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut listen = Vec::new();
    let mut upstreams = Vec::new();
    let mut udp_sockets = None;
    let mut upstream_sockets = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => listen.push(
                value()
                    .parse()
                    .unwrap_or_else(|e| usage(&format!("--listen: {e}"))),
            ),
            "--upstream" => upstreams.push(
                value()
                    .parse()
                    .unwrap_or_else(|e| usage(&format!("--upstream: {e}"))),
            ),
            "--udp-sockets" => {
                udp_sockets = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|e| usage(&format!("--udp-sockets: {e}"))),
                )
            }
            "--upstream-sockets" => {
                upstream_sockets = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|e| usage(&format!("--upstream-sockets: {e}"))),
                )
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let mut config = ProxyConfig::new(listen, upstreams);
    if let Some(n) = udp_sockets {
        config.udp_sockets_per_listen = n;
    }
    if let Some(n) = upstream_sockets {
        config.upstream_udp_sockets = n;
    }
    let table = Arc::new(Table::default());
    let proxy = match DnsProxy::start(config, Arc::new(AllowAll), table.clone(), None).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("allow_all: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("allow_all: serving on {:?}", proxy.udp_addrs());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let m = proxy.metrics();
    for (verdict, rcode, n) in m.queries() {
        println!("queries{{verdict={},rcode={rcode}}} {n}", verdict.as_str());
    }
    for (name, h) in [
        ("upstream_latency", m.upstream_latency.snapshot()),
        ("hold_time", m.hold_time.snapshot()),
    ] {
        let q = |p| {
            h.quantile_upper_bound(p)
                .map(|s| format!("{:.0}us", s * 1e6))
                .unwrap_or("-".into())
        };
        println!(
            "{name}: count {} p50<={} p99<={} mean {:.1}us",
            h.count,
            q(0.5),
            q(0.99),
            if h.count > 0 {
                h.sum_seconds / h.count as f64 * 1e6
            } else {
                0.0
            }
        );
    }
    use std::sync::atomic::Ordering::Relaxed;
    println!("hold_timeouts {}", m.hold_timeouts.load(Relaxed));
    println!("upstream_timeouts {}", m.upstream_timeouts.load(Relaxed));
    println!("upstream_failures {}", m.upstream_failures.load(Relaxed));
    println!(
        "upstream_mismatches {}",
        m.upstream_mismatches.load(Relaxed)
    );
    println!("malformed_dropped {}", m.malformed_dropped.load(Relaxed));
    println!(
        "learned_names {}",
        table.names.lock().expect("table lock").len()
    );
}
