//! The local API: HTTP/1.1 + JSON on the agent's Unix socket (mode 0600: only root talks to
//! the firewall). Answers carry the JSON shapes of [`crate::view`]; errors are
//! `{"error": "..."}` with a 4xx status.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;

use super::Agent;
use crate::api::paths;
use crate::cmd::config::GlobalSettings;
use crate::cmd::endpoint::EndpointSettings;
use crate::peer;
use crate::view::{
    EndpointView, IdentityView, IpcacheView, MapEntryView, PolicyGetView, ProxyPortsView,
    StatusView, TraceRequest, TraceView,
};

type Shared = Arc<Agent>;

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn not_found(msg: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg)
}

fn bad_request(msg: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg)
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(agent: Shared) -> Router {
    Router::new()
        .route(paths::STATUS, get(status))
        .route(paths::POLICY, get(policy_get))
        .route(paths::POLICY_TRACE, post(policy_trace))
        .route(paths::ENDPOINTS, get(endpoint_list))
        .route(
            &format!("{}/{{ep}}", paths::ENDPOINTS),
            get(endpoint_get).patch(endpoint_config),
        )
        .route(paths::CONFIG, get(config_get).patch(config_set))
        .route(paths::IDENTITIES, get(identity_list))
        .route(&format!("{}/{{id}}", paths::IDENTITIES), get(identity_get))
        .route(
            &format!("{}/{{ep}}", paths::BPF_POLICY),
            get(bpf_policy_get),
        )
        .route(paths::BPF_IPCACHE, get(bpf_ipcache_list))
        .route(
            paths::FQDN_CACHE,
            get(super::fqdn::cache_list).delete(super::fqdn::cache_clean),
        )
        .route(paths::MONITOR, get(super::fqdn::monitor))
        .with_state(agent)
}

/// Binds the API socket (replacing a stale one), restricts it to its owner, and serves until
/// the task is dropped.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "another fqdnwall agent already serves {} (stop it first, or give --api-socket)",
            path.display()
        ),
        Err(_) => {
            // Nothing answers there: a socket file left by an agent that did not stop
            // cleanly. Removing it is safe.
            let _ = std::fs::remove_file(path);
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, agent: Shared) -> std::io::Result<()> {
    axum::serve(listener, router(agent)).await
}

async fn status(State(a): State<Shared>) -> ApiResult<StatusView> {
    Ok(Json(status_view(&a)))
}

pub fn status_view(a: &Agent) -> StatusView {
    let st = a.lock();
    let errors = st.policy_errors();
    let (names, ips) = a.fqdn_counts(&st);
    StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        health: if errors.is_empty() { "ok" } else { "degraded" }.to_string(),
        datapath: a.datapath.name().to_string(),
        config: st
            .cfg
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "embedded default".to_string()),
        dns_listen: a.dns_listen().iter().map(|x| x.to_string()).collect(),
        dns_upstreams: st.cfg.dns.upstreams.iter().map(|x| x.to_string()).collect(),
        metrics_listen: a.metrics_listen().map(|m| m.to_string()),
        proxy_ports: ProxyPortsView {
            dns: st.proxy_ports.dns,
            http: st.proxy_ports.http,
            kafka: st.proxy_ports.kafka,
        },
        policy_audit_mode: st.audit_global,
        policy_revision: st.revision,
        endpoints: st.engine.endpoints().count(),
        identities: st.engine.identities().iter().count(),
        policies: st.engine.policies().count(),
        policy_errors: errors,
        ipcache_entries: a.datapath.ipcache().len(),
        policy_map_entries: a.datapath.policy_entries(),
        fqdn_names: names,
        fqdn_ips: ips,
        uptime_seconds: a.started.elapsed().as_secs(),
        bpf: a.datapath.kernel_status(),
    }
}

async fn policy_get(State(a): State<Shared>) -> ApiResult<PolicyGetView> {
    Ok(Json(a.lock().policy_view()))
}

async fn policy_trace(
    State(a): State<Shared>,
    Json(req): Json<TraceRequest>,
) -> ApiResult<TraceView> {
    let src = peer::parse(&req.src).map_err(bad_request)?;
    let dst = peer::parse(&req.dst).map_err(bad_request)?;
    let (port, proto) = peer::parse_dport(&req.dport).map_err(bad_request)?;
    let st = a.lock();
    st.trace(&src, &req.src, &dst, &req.dst, port, proto, "live")
        .map(Json)
        .map_err(not_found)
}

async fn endpoint_list(State(a): State<Shared>) -> ApiResult<Vec<EndpointView>> {
    Ok(Json(a.lock().endpoint_views()))
}

fn no_endpoint(key: &str) -> ApiError {
    not_found(format!("no endpoint {key:?}"))
}

async fn endpoint_get(
    State(a): State<Shared>,
    UrlPath(ep): UrlPath<String>,
) -> ApiResult<EndpointView> {
    let st = a.lock();
    let e = st.find_endpoint(&ep).ok_or_else(|| no_endpoint(&ep))?;
    Ok(Json(st.endpoint_view(e)))
}

async fn endpoint_config(
    State(a): State<Shared>,
    UrlPath(ep): UrlPath<String>,
    Json(s): Json<EndpointSettings>,
) -> ApiResult<EndpointView> {
    let mut st = a.lock();
    let id = st.find_endpoint(&ep).ok_or_else(|| no_endpoint(&ep))?.id;
    st.audit_endpoints.insert(id, s.policy_audit_mode);
    a.datapath
        .set_audit(id, st.audit_global || s.policy_audit_mode);
    tracing::info!(endpoint = %ep, audit = s.policy_audit_mode, "endpoint PolicyAuditMode changed");
    let e = st.find_endpoint(&ep).ok_or_else(|| no_endpoint(&ep))?;
    Ok(Json(st.endpoint_view(e)))
}

async fn config_get(State(a): State<Shared>) -> ApiResult<GlobalSettings> {
    Ok(Json(GlobalSettings {
        policy_audit_mode: a.lock().audit_global,
    }))
}

async fn config_set(
    State(a): State<Shared>,
    Json(s): Json<GlobalSettings>,
) -> ApiResult<GlobalSettings> {
    let mut st = a.lock();
    st.audit_global = s.policy_audit_mode;
    let ids: Vec<(u16, bool)> = st
        .engine
        .endpoints()
        .map(|e| {
            (
                e.id,
                st.audit_endpoints.get(&e.id).copied().unwrap_or(false),
            )
        })
        .collect();
    for (id, own) in ids {
        a.datapath.set_audit(id, s.policy_audit_mode || own);
    }
    tracing::info!(
        audit = s.policy_audit_mode,
        "global PolicyAuditMode changed"
    );
    Ok(Json(GlobalSettings {
        policy_audit_mode: st.audit_global,
    }))
}

async fn identity_list(State(a): State<Shared>) -> ApiResult<Vec<IdentityView>> {
    Ok(Json(a.lock().identity_views()))
}

async fn identity_get(
    State(a): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<IdentityView> {
    let n: u32 = id
        .parse()
        .map_err(|_| bad_request(format!("identity {id:?} is not a number")))?;
    a.lock()
        .identity_views()
        .into_iter()
        .find(|i| i.id == n)
        .map(Json)
        .ok_or_else(|| not_found(format!("no identity {n}")))
}

async fn bpf_policy_get(
    State(a): State<Shared>,
    UrlPath(ep): UrlPath<String>,
) -> ApiResult<Vec<MapEntryView>> {
    let id = {
        let st = a.lock();
        st.find_endpoint(&ep).ok_or_else(|| no_endpoint(&ep))?.id
    };
    let rows = a.datapath.policy_map(id).unwrap_or_default();
    Ok(Json(super::state::map_rows(rows)))
}

async fn bpf_ipcache_list(State(a): State<Shared>) -> ApiResult<Vec<IpcacheView>> {
    Ok(Json(
        a.datapath
            .ipcache()
            .into_iter()
            .map(|(prefix, identity)| IpcacheView {
                prefix: prefix.to_string(),
                identity,
            })
            .collect(),
    ))
}

/// Splits a raw query string into decoded `(key, value)` pairs.
pub fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
