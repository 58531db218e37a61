//! The Prometheus endpoint: `GET /metrics` on `metrics.listen`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::metrics::{load, Exposition};
use super::Agent;

pub async fn serve(listener: TcpListener, agent: Arc<Agent>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent);
    axum::serve(listener, app).await
}

async fn metrics(State(a): State<Arc<Agent>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&a),
    )
}

pub fn render(a: &Agent) -> String {
    let mut e = Exposition::default();
    {
        let st = a.lock();
        let stats = st.fqdn.stats();
        e.single(
            "fqdnwall_endpoints",
            "gauge",
            "Endpoints enforced for.",
            st.engine.endpoints().count() as f64,
        );
        e.single(
            "fqdnwall_identities",
            "gauge",
            "Numeric identities allocated.",
            st.engine.identities().iter().count() as f64,
        );
        e.single(
            "fqdnwall_fqdn_identities",
            "gauge",
            "Node-local identities of FQDN selector sets.",
            stats.identities as f64,
        );
        e.single(
            "fqdnwall_policies",
            "gauge",
            "Policies in force.",
            st.engine.policies().count() as f64,
        );
        e.single(
            "fqdnwall_policy_revision",
            "gauge",
            "Revision of the policy in force.",
            st.revision as f64,
        );
        e.single(
            "fqdnwall_policy_files_refused",
            "gauge",
            "Policy files whose current content was refused.",
            st.sources.values().filter(|s| !s.valid).count() as f64,
        );
        e.single(
            "fqdnwall_fqdn_learned_names",
            "gauge",
            "Distinct learned DNS names.",
            stats.names as f64,
        );
        e.single(
            "fqdnwall_fqdn_learned_ips",
            "gauge",
            "Distinct learned IPs.",
            stats.ips as f64,
        );
        e.single(
            "fqdnwall_fqdn_entries",
            "gauge",
            "Learned (endpoint, name, IP) entries.",
            stats.entries as f64,
        );
        e.single(
            "fqdnwall_fqdn_zombies",
            "gauge",
            "Expired (endpoint, name, IP) entries kept for open connections.",
            stats.zombies as f64,
        );
        e.single(
            "fqdnwall_fqdn_selectors",
            "gauge",
            "toFQDNs selectors in force.",
            stats.selectors as f64,
        );
    }
    e.single(
        "fqdnwall_ipcache_entries",
        "gauge",
        "Entries of the datapath's ipcache.",
        a.datapath.ipcache().len() as f64,
    );
    e.single(
        "fqdnwall_policy_map_entries",
        "gauge",
        "Entries of all policy maps.",
        a.datapath.policy_entries() as f64,
    );
    e.header(
        "fqdnwall_policy_reloads_total",
        "counter",
        "Policy directory changes, by outcome.",
    );
    e.sample(
        "fqdnwall_policy_reloads_total",
        &[("result", "applied")],
        load(&a.metrics.policy_reloads_ok),
    );
    e.sample(
        "fqdnwall_policy_reloads_total",
        &[("result", "refused")],
        load(&a.metrics.policy_reloads_failed),
    );
    e.single(
        "fqdnwall_datapath_errors_total",
        "counter",
        "Changes the datapath could not take.",
        load(&a.metrics.datapath_errors),
    );
    e.single(
        "fqdnwall_state_write_failures_total",
        "counter",
        "Attempts to write learned state to stateDir that failed.",
        load(&a.metrics.state_write_failures),
    );
    e.single(
        "fqdnwall_state_write_failing",
        "gauge",
        "1 from a failed attempt to write learned state until it is all written again, else 0.",
        load(&a.metrics.state_write_failing),
    );
    e.single(
        "fqdnwall_dns_cpu_wake_bound_held",
        "gauge",
        "1 while the dns.cpuWakeLatency bound is held (the proxy is busy), else 0.",
        load(&a.metrics.cpu_wake_engaged),
    );
    e.single(
        "fqdnwall_dns_cpu_wake_bound_engagements_total",
        "counter",
        "Times the dns.cpuWakeLatency bound was taken.",
        load(&a.metrics.cpu_wake_engagements),
    );
    if let Some(p) = a.proxy_metrics.get() {
        e.header(
            "fqdnwall_dns_queries_total",
            "counter",
            "DNS queries by policy verdict and response code (NOREPLY: none sent).",
        );
        for (v, rcode, n) in p.queries() {
            e.sample(
                "fqdnwall_dns_queries_total",
                &[("verdict", v.as_str()), ("rcode", rcode)],
                n as f64,
            );
        }
        let counters = [
            (
                "fqdnwall_dns_malformed_dropped_total",
                "Datagrams or frames that were not answerable queries.",
                &p.malformed_dropped,
            ),
            (
                "fqdnwall_dns_upstream_mismatches_total",
                "Upstream answers that matched no outstanding query.",
                &p.upstream_mismatches,
            ),
            (
                "fqdnwall_dns_upstream_timeouts_total",
                "Queries whose upstream did not answer in time.",
                &p.upstream_timeouts,
            ),
            (
                "fqdnwall_dns_upstream_failures_total",
                "Queries that failed upstream (answered SERVFAIL).",
                &p.upstream_failures,
            ),
            (
                "fqdnwall_dns_hold_timeouts_total",
                "Responses released because responseMaxDelay passed first.",
                &p.hold_timeouts,
            ),
            (
                "fqdnwall_dns_hold_failures_total",
                "Responses released although the datapath refused their entries.",
                &p.hold_failures,
            ),
            (
                "fqdnwall_dns_tcp_rejected_total",
                "TCP connections closed at accept (limit reached).",
                &p.tcp_rejected,
            ),
            (
                "fqdnwall_dns_realtime_demotions_total",
                "Times the DNS receiving threads went to normal priority, over their CPU or rate budget (dns.realtimePriority).",
                &p.realtime_demotions,
            ),
        ];
        for (name, help, c) in counters {
            e.single(name, "counter", help, c.load(Ordering::Relaxed) as f64);
        }
        e.single(
            "fqdnwall_dns_tcp_connections",
            "gauge",
            "TCP client connections open.",
            p.tcp_open.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "fqdnwall_dns_realtime_threads",
            "gauge",
            "DNS receiving threads at realtime priority now (dns.realtimePriority).",
            p.realtime_threads.load(Ordering::Relaxed) as f64,
        );
        let h = p.upstream_latency.snapshot();
        e.histogram(
            "fqdnwall_dns_upstream_latency_seconds",
            "Time from forwarding a query to its answer.",
            &h.buckets,
            h.sum_seconds,
            h.count,
        );
        let h = p.hold_time.snapshot();
        e.histogram(
            "fqdnwall_dns_hold_seconds",
            "Time a response was held until its IPs were enforceable.",
            &h.buckets,
            h.sum_seconds,
            h.count,
        );
    }
    if let Some(s) = a.l7_stats.get() {
        super::l7::render_metrics(s, &mut e);
    }
    e.finish()
}
