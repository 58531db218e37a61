//! `fqdnwall run [--config FILE]`: the agent in the foreground.
//!
//! Start-up order matters: endpoints and policies are in the engine and the datapath, and
//! learned names are restored, before the DNS proxy answers its first query — so a restart
//! never answers from an empty policy or forgets what was allowed a moment ago.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use dnsproxy::{DnsProxy, ProxyConfig};

use crate::agent::datapath::{Datapath, MemoryDatapath};
use crate::agent::fqdn::{self, AgentDns};
use crate::agent::state::AgentState;
use crate::agent::{metrics_http, reload, server, Agent};
use crate::cli::Global;
use crate::config::{Config, ConfigError, DatapathMode, RejectCode, SYSTEM_CONFIG};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file [default: /etc/fqdnwall/config.yaml if it exists, else the embedded
    /// default]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Loads the config for `run`: the given file, else the system one, else the embedded default.
/// An invalid file is reported (every problem) and is exit status 1.
pub fn load_config(given: Option<&Path>) -> anyhow::Result<Result<Config, ExitCode>> {
    let path = match given {
        Some(p) => Some(p.to_path_buf()),
        None if Path::new(SYSTEM_CONFIG).exists() => Some(PathBuf::from(SYSTEM_CONFIG)),
        None => None,
    };
    let Some(path) = path else {
        return Ok(Ok(Config::embedded_default()));
    };
    match Config::load(&path) {
        Ok(c) => Ok(Ok(c)),
        Err(ConfigError::Invalid(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!(
                "fqdnwall: {}: {} {} in the configuration",
                path.display(),
                diags.len(),
                if diags.len() == 1 { "error" } else { "errors" }
            );
            Ok(Err(ExitCode::from(1)))
        }
        Err(e @ ConfigError::Io(..)) => Err(anyhow::anyhow!("{e}")),
    }
}

pub fn run(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = match load_config(a.config.as_deref())? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if let Some(s) = &g.api_socket {
        cfg.api_socket = s.clone();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fqdnwall")
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(agent_main(cfg))
}

fn choose_datapath(mode: DatapathMode) -> anyhow::Result<Arc<dyn Datapath>> {
    match mode {
        DatapathMode::None => Ok(Arc::new(MemoryDatapath::new())),
        DatapathMode::Auto => {
            tracing::warn!(
                "datapath auto: the eBPF datapath is not part of this build; running with \
                 `datapath: none` (DNS policy enforced by the proxy, no packet enforcement)"
            );
            Ok(Arc::new(MemoryDatapath::new()))
        }
        DatapathMode::Bpf => bail!(
            "datapath bpf: the eBPF datapath is not part of this build; use `datapath: none` \
             (or `auto`) for DNS-level enforcement without packet filtering"
        ),
    }
}

fn proxy_config(cfg: &Config, datapath: &str) -> ProxyConfig {
    let mut pc = ProxyConfig::new(cfg.dns.listen.clone(), cfg.dns.upstreams.clone());
    // Interception needs a datapath that redirects endpoint DNS to the proxy; without one
    // every query is sent to the proxy itself and goes to the configured upstreams.
    pc.transparent = cfg.dns.transparent && datapath == "bpf";
    pc.reject_code = match cfg.dns.reject_response_code {
        RejectCode::Refused => dnsproxy::RejectCode::Refused,
        RejectCode::NameError => dnsproxy::RejectCode::NameError,
    };
    pc.min_ttl = cfg.dns.min_ttl;
    pc.response_max_delay = cfg.dns.response_max_delay;
    pc.forward_timeout = cfg.dns.forward_timeout;
    pc
}

async fn agent_main(cfg: Config) -> anyhow::Result<ExitCode> {
    let datapath = choose_datapath(cfg.datapath)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state directory {}", cfg.state_dir.display()))?;
    let identities = fqdn::restore_identities(&cfg.state_dir);
    let ports = AgentState::default_proxy_ports(&cfg);
    let api_socket = cfg.api_socket.clone();
    let metrics_listen = cfg.metrics.listen;
    let pc = proxy_config(&cfg, datapath.name());
    let (state, changes) = AgentState::new(cfg, identities, ports);
    let agent = Agent::new(state, datapath);
    let target = {
        let st = agent.lock();
        agent.submit(&st, &changes)
    };
    if let Err(e) = agent.wait_applied(target).await {
        bail!("the datapath did not take the endpoints: {e}");
    }
    let problems = agent.sync_policies().await;
    if !problems.is_empty() {
        tracing::warn!("some policy files were refused (see above); the others are in force");
    }
    fqdn::restore(&agent);

    let listener = server::bind(&api_socket).await?;
    let api = tokio::spawn(server::serve(listener, agent.clone()));

    let metrics_task = match metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics: cannot listen on {addr}"))?;
            let bound = l.local_addr()?;
            let _ = agent.metrics_bound.set(bound);
            Some(tokio::spawn(metrics_http::serve(l, agent.clone())))
        }
        None => None,
    };

    let hooks = Arc::new(AgentDns(agent.clone()));
    let proxy = DnsProxy::start(pc.clone(), hooks.clone(), hooks, None)
        .await
        .context("starting the DNS proxy")?;
    let _ = agent.dns_bound.set(proxy.udp_addrs().to_vec());
    // With `port: 0` in dns.listen the port is known only now; redirect entries carry it.
    if let Some(bound) = proxy.udp_addrs().first() {
        let mut st = agent.lock();
        if st.proxy_ports.dns != bound.port() {
            st.proxy_ports.dns = bound.port();
            let ports = st.proxy_ports;
            let c = st.engine.set_proxy_ports(ports);
            agent.submit(&st, &[c]);
        }
    }
    let _ = agent.proxy_metrics.set(proxy.metrics());

    let tasks = vec![
        tokio::spawn(reload::watch_loop(agent.clone())),
        tokio::spawn(fqdn::expiry_loop(agent.clone())),
        tokio::spawn(fqdn::save_loop(agent.clone())),
    ];

    print_banner(&agent, &api_socket, proxy.udp_addrs(), &pc.upstreams);

    wait_for_stop().await?;
    tracing::info!("stopping");
    drop(proxy);
    for t in tasks {
        t.abort();
    }
    api.abort();
    if let Some(m) = metrics_task {
        m.abort();
    }
    fqdn::save_now(&agent);
    fqdn::save_identities(&agent);
    let _ = std::fs::remove_file(&api_socket);
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

fn print_banner(agent: &Agent, api: &Path, dns: &[SocketAddr], upstreams: &[SocketAddr]) {
    let st = agent.lock();
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let files = st.sources.len();
    let policies = st.engine.policies().count();
    let dir = st.cfg.policy_dir.display().to_string();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "fqdnwall {} running: datapath {}, config {}",
        env!("CARGO_PKG_VERSION"),
        agent.datapath.name(),
        st.cfg
            .file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "embedded default".into())
    );
    let _ = writeln!(
        out,
        "DNS proxy listening on {} (UDP and TCP), forwarding to {}",
        list(dns),
        list(upstreams)
    );
    let _ = writeln!(out, "API socket: {}", api.display());
    if let Some(m) = agent.metrics_listen() {
        let _ = writeln!(out, "Metrics: http://{m}/metrics");
    }
    if policies == 0 {
        let _ = writeln!(
            out,
            "Policies: none in {dir}: every query is allowed, logged and learned"
        );
    } else {
        let _ = writeln!(
            out,
            "Policies: {policies} from {files} files in {dir} (revision {})",
            st.revision
        );
    }
    let first = dns.first().copied();
    let _ = writeln!(
        out,
        "Add a policy: check it with `fqdnwall policy validate FILE`, then copy it into {dir}/ \
         (applied within a second; `fqdnwall policy get` shows what is in force)"
    );
    if let Some(a) = first {
        let _ = writeln!(out, "Try it: dig @{} -p {} example.com", a.ip(), a.port());
    }
    let _ = out.flush();
}
