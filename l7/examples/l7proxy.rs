//! Runs the L7 proxies in front of fixed upstreams (the non-transparent mode), with a rule
//! set like a real policy's, for benchmarks and manual testing:
//!
//!   l7proxy --http LISTEN UPSTREAM [--http-rules N] [--kafka LISTEN UPSTREAM] [--kafka-topic T]
//!           [--workers N] [--runtime workers|multi|per-thread]
//!
//! N (`--workers`) defaults to the number of CPUs (`workers`: half of them, see below). Each accepted HTTP connection is one task,
//! which also drives its upstream HTTP/1.1 connection. Where the tasks run:
//! - `workers` (the default): one listener and accept loop; each connection goes to the least
//!   busy of N threads running a single-threaded runtime each (`l7::ConnectionWorkers`;
//!   without `--workers`, one per two CPUs, pinned when several, as in the agent:
//!   `ConnectionWorkers::for_node`). The accept
//!   loops and the Kafka proxy run on a multi-thread runtime, as in the agent.
//! - `multi`: one multi-thread Tokio runtime with N worker threads and one listener per
//!   proxy; idle workers steal tasks from busy ones.
//! - `per-thread`: N threads, each with its own single-threaded runtime and its own listener
//!   on the shared address (SO_REUSEPORT), so the kernel spreads connections over them by a
//!   hash of their addresses (and a thread cannot hand work to another).
//!
//! The HTTP rule set has N rules (default 20): N-1 that do not match typical traffic and a
//! last one allowing `GET /api/v1/.*`. The Kafka rules allow role produce on topic T
//! (default `bench`), so every request is decoded and its topics matched.

use std::net::SocketAddr;
use std::sync::Arc;

use l7::{
    ConnectionWorkers, EventSink, HttpPolicy, HttpProxy, HttpProxyConfig, KafkaPolicy, KafkaProxy,
    KafkaProxyConfig, ProxyMode, Redirect, SecretDir, SwappablePolicy,
};
use policy::model::{HeaderRule, HttpRule, KafkaRole, KafkaRule};

fn http_rules(n: usize) -> Vec<HttpRule> {
    let mut rules: Vec<HttpRule> = (0..n.saturating_sub(1))
        .map(|i| HttpRule {
            method: Some(if i % 2 == 0 { "POST" } else { "PUT|PATCH" }.into()),
            path: Some(format!("/service{i}/v[0-9]+/items/[0-9]+")),
            host: (i % 3 == 0).then(|| format!(r"svc{i}\.example\.com")),
            headers: if i % 4 == 0 {
                vec![HeaderRule {
                    name: "x-tenant".into(),
                    value: Some(format!("t{i}")),
                }]
            } else {
                Vec::new()
            },
            ..Default::default()
        })
        .collect();
    rules.push(HttpRule {
        method: Some("GET".into()),
        path: Some("/api/v1/.*".into()),
        ..Default::default()
    });
    rules
}

fn arg_after(args: &[String], flag: &str, i: usize) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|p| args.get(p + i).cloned())
}

fn addr(s: Option<String>, what: &str) -> SocketAddr {
    s.unwrap_or_else(|| panic!("missing {what}"))
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let chosen: Option<usize> =
        arg_after(&args, "--workers", 1).map(|s| s.parse().expect("--workers N"));
    let workers =
        chosen.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    match arg_after(&args, "--runtime", 1).as_deref() {
        None | Some("workers") => {
            // As the agent (ConnectionWorkers::for_node), unless a count is asked for.
            let pool = match chosen {
                Some(n) => ConnectionWorkers::start(n, "l7proxy"),
                None => ConnectionWorkers::for_node("l7proxy"),
            }
            .expect("worker threads");
            // The accept loops (and the Kafka proxy) on a multi-thread runtime, as in the agent.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(worker(args, true, Some(Arc::new(pool))));
        }
        Some("multi") => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(worker(args, true, None));
        }
        Some("per-thread") => {
            let handles: Vec<_> = (0..workers)
                .map(|i| {
                    let args = args.clone();
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime");
                        rt.block_on(worker(args, i == 0, None));
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
        }
        Some(other) => panic!("--runtime {other}: expected workers, multi or per-thread"),
    }
}

/// Binds the proxies and serves them (HTTP connections on `pool` when given).
async fn worker(args: Vec<String>, first: bool, pool: Option<Arc<ConnectionWorkers>>) {
    let policy = Arc::new(SwappablePolicy::new());
    let events = EventSink::new(1024);
    let mut tasks = Vec::new();
    let redirect = |p| Redirect {
        endpoint_id: 1,
        endpoint: Arc::from("bench"),
        remote_identity: 256,
        policy: Arc::new(p),
    };
    if args.iter().any(|a| a == "--http") {
        let n = arg_after(&args, "--http-rules", 1)
            .map(|s| s.parse().expect("--http-rules N"))
            .unwrap_or(20);
        let rules = HttpPolicy::compile(&http_rules(n), &SecretDir::new("/nonexistent"))
            .expect("rules compile");
        policy.set_http(Some(redirect(rules)));
        let listen = addr(arg_after(&args, "--http", 1), "--http LISTEN");
        let upstream = addr(arg_after(&args, "--http", 2), "--http UPSTREAM");
        let proxy = HttpProxy::bind(
            HttpProxyConfig::new(
                listen,
                ProxyMode::Fixed {
                    upstream,
                    mark: None,
                },
            ),
            policy.clone(),
            events.clone(),
        )
        .expect("bind http proxy");
        if first {
            println!(
                "http proxy on {} -> {upstream} with {n} rules",
                proxy.local_addr()
            );
        }
        tasks.push(tokio::spawn(proxy.run_on_workers(pool)));
    }
    if args.iter().any(|a| a == "--kafka") {
        let topic = arg_after(&args, "--kafka-topic", 1).unwrap_or_else(|| "bench".into());
        let rules = KafkaPolicy::compile(&[KafkaRule {
            role: Some(KafkaRole::Produce),
            topic: Some(topic.clone()),
            ..Default::default()
        }])
        .expect("kafka rules");
        policy.set_kafka(Some(Redirect {
            endpoint_id: 1,
            endpoint: Arc::from("bench"),
            remote_identity: 256,
            policy: Arc::new(rules),
        }));
        let listen = addr(arg_after(&args, "--kafka", 1), "--kafka LISTEN");
        let upstream = addr(arg_after(&args, "--kafka", 2), "--kafka UPSTREAM");
        let proxy = KafkaProxy::bind(
            KafkaProxyConfig::new(
                listen,
                ProxyMode::Fixed {
                    upstream,
                    mark: None,
                },
            ),
            policy.clone(),
            events.clone(),
        )
        .expect("bind kafka proxy");
        if first {
            println!(
                "kafka proxy on {} -> {upstream}, produce allowed to {topic}",
                proxy.local_addr()
            );
        }
        tasks.push(tokio::spawn(proxy.run()));
    }
    if tasks.is_empty() {
        eprintln!("usage: l7proxy --http LISTEN UPSTREAM [--http-rules N] [--kafka LISTEN UPSTREAM] [--kafka-topic T] [--workers N] [--runtime workers|multi|per-thread]");
        std::process::exit(2);
    }
    for t in tasks {
        let _ = t.await;
    }
}
