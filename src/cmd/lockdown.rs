//! `fqdnwall lockdown --policy FILE [--label K=V]... -- CMD [ARG...]`: run a command as a
//! fresh endpoint in its own network namespace, enforced by the eBPF datapath.
//!
//! Design: lockdown is self-contained. It starts an agent inside its own process (the same
//! code as `fqdnwall run`, with its own pin directory, proxy marks and routing table, so it
//! runs next to a system agent without touching it) for exactly one endpoint:
//!
//! ```text
//!  netns fwl<pid>: eth0 10.215.a.b+2/30 ── veth ── host: fwl<pid>h 10.215.a.b+1/30  [programs]
//!                                                   └─ forwarded and masqueraded (nftables)
//!                                                      out of the host's own interfaces
//! ```
//!
//! The command's DNS goes to the host's resolvers (or, when those are loopback addresses,
//! to the gateway, which hands it to them); either way the datapath intercepts it, so the
//! policy's DNS rules and toFQDNs apply exactly as they would to a workload of `run`. When
//! the command exits, the agent stops with `--unload-on-stop` semantics, and the namespace,
//! veth, NAT table, resolv.conf and pins are removed (also on error: a Drop guard). The exit
//! status is the command's (128 + N when a signal N ended it). A summary of the names and
//! flows allowed and denied goes to stderr.
//!
//! A broken policy is reported the same way `policy validate` reports it, before anything
//! is set up. Without root (or without a kernel that loads the programs) the command is not
//! started: running it unconfined would be a firewall that lies.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::agent::bpf;
use crate::cli::Global;
use crate::cmd::run::{agent_main, RunOptions};
use crate::config::{Config, ConfigError};
use crate::policies::{self, Loaded};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy the command runs under
    #[arg(long, value_name = "FILE")]
    pub policy: std::path::PathBuf,
    /// A label of the command's endpoint (repeatable); its namespace is `default`
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(_g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                labels.insert(k.to_string(), v.to_string());
            }
            _ => bail!("--label takes K=V, found {l:?}"),
        }
    }
    match policies::load(&a.policy) {
        Loaded::Ok(_) => {}
        Loaded::Invalid(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            return Ok(ExitCode::from(1));
        }
        Loaded::Io(e) => bail!("cannot read {}: {e}", a.policy.display()),
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "lockdown confines {:?} with the eBPF datapath, which needs root (network \
             namespaces, BPF programs); the command was not started",
            a.command[0]
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fqdnwall-lockdown")
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(lockdown(a, labels))
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything lockdown set up on the host; removed on drop, in reverse.
struct Sandbox {
    netns: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ep_ip: Ipv4Addr,
    dir: PathBuf,
    pin: PathBuf,
    forward_before: Option<String>,
    nft_table: Option<String>,
    netns_etc: Option<PathBuf>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The namespace takes its end of the veth, and the veth its programs, with it.
        let _ = sh("ip", &["netns", "del", &self.netns]);
        let _ = sh("ip", &["link", "del", &self.host_if]);
        if let Some(t) = &self.nft_table {
            let _ = sh("nft", &["delete", "table", "ip", t]);
        }
        if let Some(v) = &self.forward_before {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", v);
        }
        if let Some(d) = &self.netns_etc {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = ebpf::remove_pins(&self.pin);
        let _ = std::fs::remove_dir_all(&self.pin);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A /30 of 10.215.0.0/16 that no local interface uses yet.
fn pick_subnet(pid: u32) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let used = sh("ip", &["-o", "-4", "addr", "show"])?;
    for i in 0..16384u32 {
        let k = (pid + i) % 16384;
        let base = u32::from(Ipv4Addr::new(10, 215, 0, 0)) + k * 4;
        let host = Ipv4Addr::from(base + 1);
        let ep = Ipv4Addr::from(base + 2);
        if !used.contains(&format!(" {host}/")) && !used.contains(&format!(" {ep}/")) {
            return Ok((host, ep));
        }
    }
    bail!("no free /30 left in 10.215.0.0/16")
}

fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let port = u.local_addr()?.port();
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port for the DNS proxy")
}

impl Sandbox {
    fn create() -> anyhow::Result<Sandbox> {
        let pid = std::process::id();
        let (host_ip, ep_ip) = pick_subnet(pid)?;
        let pin = std::env::var_os(bpf::PIN_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/fqdnwall-lockdown-{pid}")));
        let mut sb = Sandbox {
            netns: format!("fwl{pid}"),
            host_if: format!("fwl{pid}h"),
            host_ip,
            ep_ip,
            dir: std::env::temp_dir().join(format!("fqdnwall-lockdown-{pid}")),
            pin,
            forward_before: None,
            nft_table: None,
            netns_etc: None,
        };
        std::fs::create_dir_all(sb.dir.join("policies"))
            .with_context(|| format!("creating {}", sb.dir.display()))?;
        let ns = sb.netns.clone();
        let hif = sb.host_if.clone();
        sh("ip", &["netns", "add", &ns])?;
        sh(
            "ip",
            &[
                "link", "add", &hif, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        sh(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &hif],
        )?;
        sh("ip", &["link", "set", &hif, "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ep_ip}/30"),
                "dev",
                "eth0",
            ],
        )?;
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &host_ip.to_string(),
            ],
        )?;
        // Forwarding and NAT so the command reaches what the host reaches.
        let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .context("reading net.ipv4.ip_forward")?;
        if fwd.trim() != "1" {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .context("enabling net.ipv4.ip_forward")?;
            sb.forward_before = Some(fwd);
        }
        let table = format!("fqdnwall_lockdown_{pid}");
        let script = format!(
            "add table ip {table}\n\
             add chain ip {table} post {{ type nat hook postrouting priority 100 ; }}\n\
             add rule ip {table} post ip saddr {ep_ip} oifname != \"{hif}\" masquerade\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (nftables)")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        sb.nft_table = Some(table);
        Ok(sb)
    }

    /// The resolv.conf the command sees (`ip netns exec` mounts /etc/netns/NAME/*).
    fn write_resolv_conf(&mut self, servers: &[SocketAddr]) -> anyhow::Result<()> {
        let d = PathBuf::from("/etc/netns").join(&self.netns);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        self.netns_etc = Some(d.clone());
        let mut text = String::from("# written by fqdnwall lockdown\n");
        for s in servers {
            text.push_str(&format!("nameserver {}\n", s.ip()));
        }
        std::fs::write(d.join("resolv.conf"), text)?;
        Ok(())
    }
}

#[derive(Default)]
struct Summary {
    names: BTreeMap<(String, &'static str), u64>,
    flows: BTreeMap<(String, &'static str), u64>,
}

async fn lockdown(a: Args, labels: BTreeMap<String, String>) -> anyhow::Result<ExitCode> {
    let mut sb = Sandbox::create()?;
    let policy_name = a
        .policy
        .file_name()
        .map(|f| f.to_os_string())
        .unwrap_or_else(|| "policy.yaml".into());
    std::fs::copy(&a.policy, sb.dir.join("policies").join(&policy_name))
        .with_context(|| format!("copying {}", a.policy.display()))?;

    let system = crate::config::system_upstreams();
    let usable: Vec<SocketAddr> = system
        .iter()
        .copied()
        .filter(|s| !s.ip().is_loopback())
        .collect();
    // Resolvers the namespace can reach are used as they are; a loopback-only resolver
    // (systemd-resolved, a local cache) is reached through the gateway.
    let gateway = usable.is_empty().then_some(IpAddr::V4(sb.host_ip));
    if usable.is_empty() {
        sb.write_resolv_conf(&[SocketAddr::new(IpAddr::V4(sb.host_ip), 53)])?;
    } else {
        sb.write_resolv_conf(&usable)?;
    }

    let port = free_port()?;
    let labels_yaml = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{}: {}",
                serde_json::to_string(k).expect("string"),
                serde_json::to_string(v).expect("string")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let cfg_text = format!(
        "policyDir: policies\nstateDir: state\napiSocket: {sock}\ndatapath: bpf\n\
         dns:\n  listen: [\"127.0.0.1:{port}\"]\n  transparent: true\n\
         endpoints:\n  - name: lockdown\n    namespace: default\n    labels: {{{labels_yaml}}}\n    \
         ips: [\"{ep}\"]\n    interface: {hif}\n\
         metrics:\n  listen: null\n",
        sock = sb.dir.join("api.sock").display(),
        ep = sb.ep_ip,
        hif = sb.host_if,
    );
    let cfg_path = sb.dir.join("config.yaml");
    std::fs::write(&cfg_path, &cfg_text)?;
    let cfg = match Config::load(&cfg_path) {
        Ok(c) => c,
        Err(ConfigError::Invalid(d)) => bail!(
            "lockdown built an invalid configuration: {}",
            d.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Err(e) => bail!("{e}"),
    };
    // The in-process agent reads its pin directory from the environment.
    std::env::set_var(bpf::PIN_DIR_ENV, &sb.pin);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let opts = RunOptions {
        unload_on_stop: true,
        marks: bpf::LOCKDOWN_MARKS,
        banner: false,
        dns_gateway: gateway,
    };
    let agent_task = tokio::spawn(agent_main(
        cfg,
        opts,
        async move {
            let _ = stop_rx.await;
            Ok(())
        },
        Some(ready_tx),
    ));
    let agent = match ready_rx.await {
        Ok(a) => a,
        Err(_) => {
            // The agent ended before it was ready: its error says why.
            return match agent_task.await {
                Ok(Err(e)) => Err(e.context("lockdown: the agent did not start")),
                _ => bail!("lockdown: the agent did not start"),
            };
        }
    };

    let summary = Arc::new(Mutex::new(Summary::default()));
    let mut rx = agent.events.subscribe();
    let collector = {
        let summary = summary.clone();
        tokio::spawn(async move {
            while let Ok(e) = rx.recv().await {
                let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
                if e.kind == "dns" {
                    let q = e
                        .extra
                        .get("query")
                        .and_then(|q| q.as_str())
                        .unwrap_or("?")
                        .to_string();
                    *s.names.entry((q, e.verdict)).or_default() += 1;
                } else if e.kind == "drop" || e.kind == "policy-verdict" {
                    let flow = format!(
                        "{} {}:{}",
                        e.protocol.unwrap_or("?"),
                        e.dst_ip.as_deref().unwrap_or("?"),
                        e.dport.unwrap_or(0)
                    );
                    *s.flows.entry((flow, e.verdict)).or_default() += 1;
                }
            }
        })
    };

    eprintln!(
        "fqdnwall lockdown: running {:?} in network namespace {} ({}), policy {}",
        a.command.join(" "),
        sb.netns,
        sb.ep_ip,
        a.policy.display()
    );
    let status = run_command(&sb.netns, &a.command).await;
    // Let the last kernel events arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(());
    match agent_task.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("fqdnwall lockdown: agent: {e:#}"),
        Err(e) => eprintln!("fqdnwall lockdown: agent: {e}"),
    }
    collector.abort();
    print_summary(&summary.lock().unwrap_or_else(|p| p.into_inner()));
    drop(agent);
    drop(sb);
    let status = status.with_context(|| format!("starting {:?}", a.command[0]))?;
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Runs the command in the namespace. SIGINT and SIGTERM are passed on to it rather than
/// ending lockdown, which must live on to clean up after it.
async fn run_command(netns: &str, command: &[String]) -> std::io::Result<std::process::ExitStatus> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .spawn()?;
    loop {
        let sig = tokio::select! {
            st = child.wait() => return st,
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        };
        if let Some(pid) = child.id() {
            // SAFETY: kill on the pid of our own child, which we have not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }
}

fn print_summary(s: &Summary) {
    let list = |m: &BTreeMap<(String, &'static str), u64>, verdicts: &[&str]| -> Vec<String> {
        m.iter()
            .filter(|((_, v), _)| verdicts.contains(v))
            .map(|((k, _), n)| format!("{k} ({n})"))
            .collect()
    };
    let line = |title: &str, v: Vec<String>| {
        if v.is_empty() {
            eprintln!("  {title}: none");
        } else {
            eprintln!("  {title}: {}", v.join(", "));
        }
    };
    eprintln!("fqdnwall lockdown: summary");
    line("names allowed", list(&s.names, &["allowed"]));
    line("names denied", list(&s.names, &["denied"]));
    line(
        "flows allowed",
        list(&s.flows, &["allowed", "redirected", "audit"]),
    );
    line("flows denied", list(&s.flows, &["denied"]));
}
