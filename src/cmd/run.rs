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

use crate::agent::bpf::{self, KernelDatapath};
use crate::agent::datapath::{Datapath, MemoryDatapath};
use crate::agent::fqdn::{self, AgentDns};
use crate::agent::l7::L7Listeners;
use crate::agent::state::AgentState;
use crate::agent::{metrics_http, reload, server, wake, Agent};
use crate::cli::Global;
use crate::config::{Config, ConfigError, DatapathMode, RejectCode, SYSTEM_CONFIG};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file [default: /etc/fqdnwall/config.yaml if it exists, else the embedded
    /// default]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// On a clean stop (SIGTERM/SIGINT), detach the eBPF programs and remove their pinned
    /// maps: enforcement ends with the agent. Without it the kernel keeps enforcing the last
    /// maps until the next `fqdnwall run` adopts them.
    #[arg(long)]
    pub unload_on_stop: bool,
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
    let opts = RunOptions {
        unload_on_stop: a.unload_on_stop,
        marks: bpf::AGENT_MARKS,
        banner: true,
        dns_gateway: None,
    };
    rt.block_on(agent_main(cfg, opts, wait_for_stop(), None))
}

/// How an agent runs: `fqdnwall run`, or the one `lockdown` starts inside itself.
pub struct RunOptions {
    pub unload_on_stop: bool,
    pub marks: bpf::Marks,
    /// Print the start-up banner on stdout.
    pub banner: bool,
    /// DNS sent to this address (a gateway with no DNS server of its own) goes to the
    /// configured upstreams instead of its original destination.
    pub dns_gateway: Option<std::net::IpAddr>,
}

/// Sends intercepted DNS addressed to a gateway to the configured upstreams.
struct GatewayDns {
    gateway: std::net::IpAddr,
    upstreams: Vec<SocketAddr>,
}

impl dnsproxy::OriginalDst for GatewayDns {
    fn original_dst(
        &self,
        _client: SocketAddr,
        received_on: SocketAddr,
        _transport: dnsproxy::Transport,
    ) -> Option<SocketAddr> {
        (received_on.ip() == self.gateway && received_on.port() == 53)
            .then(|| self.upstreams.first().copied())
            .flatten()
    }
}

/// The datapath for the agent, and the kernel one again when it is that.
type Chosen = (Arc<dyn Datapath>, Option<Arc<KernelDatapath>>);

/// The datapath of `mode`; the kernel one is also returned as itself (start-up and stop
/// drive it beyond the trait).
fn choose_datapath(cfg: &Config, dns_port: u16, marks: &bpf::Marks) -> anyhow::Result<Chosen> {
    let config = ebpf::DatapathConfig {
        dns_proxy_port: if cfg.dns.transparent { dns_port } else { 0 },
        proxy_mark: marks.mark,
        proxy_out_mark: marks.out_mark,
        proxy_mark_mask: marks.mask,
        audit: false,
        verdict_events: true,
    };
    let kernel = |k: KernelDatapath| {
        let k = Arc::new(k);
        let dp: Arc<dyn Datapath> = k.clone();
        (dp, Some(k))
    };
    match cfg.datapath {
        DatapathMode::None => Ok((Arc::new(MemoryDatapath::new()), None)),
        DatapathMode::Bpf => {
            let k = KernelDatapath::load(config).map_err(|e| {
                anyhow::anyhow!(
                    "datapath bpf: cannot load the eBPF programs ({e}); it needs root and a \
                     kernel with BPF, TCX and bpffs (or use `datapath: none`)"
                )
            })?;
            Ok(kernel(k))
        }
        DatapathMode::Auto => {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let interfaces = cfg.endpoints.iter().any(|e| e.interface.is_some())
                || !cfg.host.interfaces.is_empty();
            let why = if !root {
                "not running as root".to_string()
            } else if !interfaces {
                "no endpoint `interface` and no `host.interfaces` to attach to".to_string()
            } else {
                match KernelDatapath::load(config) {
                    Ok(k) => return Ok(kernel(k)),
                    Err(e) => format!("the eBPF programs do not load: {e}"),
                }
            };
            tracing::warn!(
                "datapath auto: {why}; running with `datapath: none` (DNS policy enforced by \
                 the proxy, no packet enforcement)"
            );
            Ok((Arc::new(MemoryDatapath::new()), None))
        }
    }
}

/// The interfaces the kernel datapath attaches to, with their endpoints' identities.
fn interfaces(st: &AgentState) -> Vec<bpf::Interface> {
    let mut out = Vec::new();
    for e in &st.cfg.endpoints {
        let Some(ifname) = &e.interface else {
            tracing::warn!(
                endpoint = %e.name,
                "no `interface`: the eBPF datapath cannot enforce this endpoint's packets"
            );
            continue;
        };
        out.push(bpf::Interface {
            ifname: ifname.clone(),
            kind: ebpf::AttachKind::Endpoint,
            endpoint: e.id,
            identity: st.engine.endpoint_identity(e.id).unwrap_or(0),
        });
    }
    if let Some(host) = st.engine.endpoints().find(|e| e.is_host) {
        for ifname in &st.cfg.host.interfaces {
            out.push(bpf::Interface {
                ifname: ifname.clone(),
                kind: ebpf::AttachKind::Host,
                endpoint: host.id,
                identity: st.engine.endpoint_identity(host.id).unwrap_or(1),
            });
        }
    }
    out
}

fn proxy_config(cfg: &Config, datapath: &str, marks: &bpf::Marks) -> ProxyConfig {
    let mut pc = ProxyConfig::new(cfg.dns.listen.clone(), cfg.dns.upstreams.clone());
    // Interception needs a datapath that redirects endpoint DNS to the proxy; without one
    // every query is sent to the proxy itself and goes to the configured upstreams.
    pc.transparent = cfg.dns.transparent && datapath == "bpf";
    if pc.transparent {
        // The programs hand intercepted DNS to the socket of the proxy port whatever the
        // original destination was: that takes a wildcard listener of each port (IPv4 and
        // IPv6). Queries sent to the proxy's own port still work; intercepted ones arrive on
        // port 53 of the original server and are forwarded there, with the mark that keeps the
        // proxy's own queries from being intercepted again.
        let mut listen: Vec<SocketAddr> = Vec::new();
        for a in &cfg.dns.listen {
            for ip in [
                std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            ] {
                let w = SocketAddr::new(ip, a.port());
                if !listen.contains(&w) {
                    listen.push(w);
                }
            }
        }
        pc.listen = listen;
        pc.upstream_mark = Some(marks.out_mark);
    }
    pc.reject_code = match cfg.dns.reject_response_code {
        RejectCode::Refused => dnsproxy::RejectCode::Refused,
        RejectCode::NameError => dnsproxy::RejectCode::NameError,
    };
    pc.min_ttl = cfg.dns.min_ttl;
    pc.response_max_delay = cfg.dns.response_max_delay;
    pc.forward_timeout = cfg.dns.forward_timeout;
    pc.realtime_priority = cfg.dns.realtime_priority;
    pc
}

/// The agent until `stop` resolves; `ready` gets it once the DNS proxy serves.
pub async fn agent_main(
    cfg: Config,
    opts: RunOptions,
    stop: impl std::future::Future<Output = anyhow::Result<()>>,
    ready: Option<tokio::sync::oneshot::Sender<Arc<Agent>>>,
) -> anyhow::Result<ExitCode> {
    let unload_on_stop = opts.unload_on_stop;
    let marks = opts.marks;
    let ports = AgentState::default_proxy_ports(&cfg);
    let (datapath, kernel) = choose_datapath(&cfg, ports.dns, &marks)?;
    // The L7 proxies' ports go into the first policy entries (never a redirect to port 0);
    // with the kernel datapath they take steered flows transparently.
    let l7_listeners =
        L7Listeners::bind(&cfg.l7, kernel.is_some()).context("starting the L7 proxies")?;
    let ports = l7_listeners.proxy_ports(ports);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state directory {}", cfg.state_dir.display()))?;
    let identities = fqdn::restore_identities(&cfg.state_dir);
    let api_socket = cfg.api_socket.clone();
    let metrics_listen = cfg.metrics.listen;
    let pc = proxy_config(&cfg, datapath.name(), &marks);
    let cpu_wake_latency = cfg.dns.cpu_wake_latency;
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
    let transparent = pc.transparent;
    if let Some(k) = &kernel {
        // The computed state is complete: the kernel takes it (reconciled against what a
        // previous run left pinned), then the programs go on the interfaces.
        let ifaces = {
            let st = agent.lock();
            let ifaces = interfaces(&st);
            for i in &ifaces {
                let own = st
                    .audit_endpoints
                    .get(&i.endpoint)
                    .copied()
                    .unwrap_or(false);
                k.set_audit(i.endpoint, st.audit_global || own);
            }
            ifaces
        };
        k.go_live(ifaces)
            .map_err(|e| anyhow::anyhow!("datapath bpf: {e}"))?;
        // The L7 proxies always take steered flows with the kernel datapath.
        {
            marks
                .routing
                .install()
                .context("datapath bpf: installing the proxy routing rule")?;
        }
        match k.inner().events() {
            Ok(stream) => {
                tokio::spawn(bpf::event_loop(agent.clone(), stream));
            }
            Err(e) => tracing::warn!("kernel events unavailable: {e}"),
        }
    }

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
    let gateway: Option<Arc<dyn dnsproxy::OriginalDst>> = opts.dns_gateway.map(|g| {
        Arc::new(GatewayDns {
            gateway: g,
            upstreams: pc.upstreams.clone(),
        }) as Arc<dyn dnsproxy::OriginalDst>
    });
    let proxy = DnsProxy::start(pc.clone(), hooks.clone(), hooks, gateway)
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
    if let (Some(k), true) = (&kernel, transparent) {
        let port = agent.lock().proxy_ports.dns;
        k.set_dns_proxy_port(port)
            .context("datapath bpf: setting the DNS proxy port")?;
    }

    let mut tasks = l7_listeners.start(&agent, marks.out_mark);
    tasks.extend([
        tokio::spawn(reload::watch_loop(agent.clone())),
        tokio::spawn(fqdn::expiry_loop(agent.clone())),
        tokio::spawn(fqdn::save_loop(agent.clone())),
    ]);
    if let Some(bound) = cpu_wake_latency {
        tasks.push(tokio::spawn(wake::wake_loop(agent.clone(), bound)));
    }

    if opts.banner {
        print_banner(&agent, &api_socket, proxy.udp_addrs(), &pc.upstreams);
    }
    if let Some(r) = ready {
        let _ = r.send(agent.clone());
    }

    let stopped = stop.await;
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
    if let Some(k) = &kernel {
        if unload_on_stop {
            match k.unload() {
                Ok(()) => tracing::info!("eBPF programs detached and pins removed"),
                Err(e) => tracing::error!("unloading the eBPF datapath: {e}"),
            }
            let _ = marks.routing.remove();
        } else {
            tracing::info!(
                "the kernel keeps enforcing the last policy (pins in {}); the next \
                 `fqdnwall run` adopts it, `--unload-on-stop` ends it with the agent",
                k.inner().pin_dir().display()
            );
        }
    }
    let _ = std::fs::remove_file(&api_socket);
    tracing::info!("stopped");
    stopped?;
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
