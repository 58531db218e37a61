//! Sets up fqdnwall's datapath on one endpoint interface for the veth benchmark
//! (bench/ebpf/run.sh), keeps it in force until SIGINT or SIGTERM, then unloads it.
//!
//! ```text
//! bench_endpoint --netns NS --ifname IF --pin DIR --server IP --ports P,P
//!                [--entries N] [--ipcache N]
//! ```
//! Runs in network namespace NS (entered with setns, so the pins land in the machine's
//! bpffs rather than in the private sysfs of `ip netns exec`). IF is the host side of the
//! endpoint's veth. The endpoint (id 1, identity 300) gets N egress policy entries in total
//! (default 1,000): TCP on each of the given ports to the server's identity 1000 (what the
//! benchmark's flows use), the rest spread over other identities, exact ports and port
//! ranges. The ipcache maps the server's /32 to 1000, plus N other /32 entries (default
//! 1,000) and a few LPM prefixes. Both directions are enforced: the server's replies pass by
//! connection tracking. Prints `ready` when traffic sees the programs; on exit prints the
//! packet counters of the entries the flows used, so the run shows they went through them.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use ebpf::{BpfDatapath, Capacities, EndpointFlags, EndpointSpec, EntryValue, LoadOptions};
use ipnet::{IpNet, Ipv4Net};
use policy::mapstate::MapKey;
use policy::model::Direction;

const ENDPOINT: u16 = 1;
const ENDPOINT_IDENTITY: u32 = 300;
const SERVER_IDENTITY: u32 = 1000;

struct Args {
    netns: String,
    ifname: String,
    pin: PathBuf,
    server: Ipv4Addr,
    ports: Vec<u16>,
    entries: usize,
    ipcache: u32,
}

fn usage() -> String {
    "usage: bench_endpoint --netns NS --ifname IF --pin DIR --server IPV4 --ports P[,P...] \
     [--entries N] [--ipcache N]"
        .to_string()
}

fn parse_args() -> Result<Args, String> {
    let mut netns = None;
    let mut ifname = None;
    let mut pin = None;
    let mut server = None;
    let mut ports = None;
    let mut entries = 1_000usize;
    let mut ipcache = 1_000u32;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))
        };
        match flag.as_str() {
            "--netns" => netns = Some(value()?),
            "--ifname" => ifname = Some(value()?),
            "--pin" => pin = Some(PathBuf::from(value()?)),
            "--server" => {
                let v = value()?;
                server = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|e| format!("--server {v}: {e}"))?,
                );
            }
            "--ports" => {
                let v = value()?;
                let p: Result<Vec<u16>, _> = v.split(',').map(str::parse::<u16>).collect();
                ports = Some(p.map_err(|e| format!("--ports {v}: {e}"))?);
            }
            "--entries" => {
                let v = value()?;
                entries = v.parse().map_err(|e| format!("--entries {v}: {e}"))?;
            }
            "--ipcache" => {
                let v = value()?;
                ipcache = v.parse().map_err(|e| format!("--ipcache {v}: {e}"))?;
            }
            _ => return Err(format!("unknown argument {flag}\n{}", usage())),
        }
    }
    let missing = |what: &str| format!("{what} is required\n{}", usage());
    let ports = ports.ok_or_else(|| missing("--ports"))?;
    let entries_min = ports.len();
    if entries < entries_min {
        return Err(format!(
            "--entries {entries}: at least one per port ({entries_min})"
        ));
    }
    Ok(Args {
        netns: netns.ok_or_else(|| missing("--netns"))?,
        ifname: ifname.ok_or_else(|| missing("--ifname"))?,
        pin: pin.ok_or_else(|| missing("--pin"))?,
        server: server.ok_or_else(|| missing("--server"))?,
        ports,
        entries,
        ipcache,
    })
}

fn egress(identity: u32, protocol: u8, port: u16, prefix_len: u8) -> MapKey {
    MapKey {
        identity,
        direction: Direction::Egress,
        protocol,
        port,
        prefix_len,
    }
}

/// The endpoint's policy: the benchmark's ports to the server first, then filler entries
/// (TCP 443 exact, UDP 53 exact, TCP 8000-8063) for identities 1001.. up to `n` entries.
fn policy_entries(ports: &[u16], n: usize) -> Vec<(MapKey, EntryValue)> {
    let mut adds: Vec<(MapKey, EntryValue)> = ports
        .iter()
        .map(|&p| (egress(SERVER_IDENTITY, 6, p, 16), EntryValue::default()))
        .collect();
    let mut identity = SERVER_IDENTITY + 1;
    'fill: loop {
        for (protocol, port, plen) in [(6u8, 443u16, 16u8), (17, 53, 16), (6, 8000, 10)] {
            if adds.len() >= n {
                break 'fill;
            }
            adds.push((
                egress(identity, protocol, port, plen),
                EntryValue::default(),
            ));
        }
        identity += 1;
    }
    adds
}

fn enter_netns(name: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{name}");
    let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: a valid namespace fd; the process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Blocks SIGINT and SIGTERM (so they queue instead of killing us) and returns the set.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` was filled by block_signals; sigwait writes the signal number.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn setup(args: &Args) -> Result<BpfDatapath, String> {
    let dp = BpfDatapath::load_or_adopt(&LoadOptions {
        pin_dir: args.pin.clone(),
        capacities: Capacities {
            policy: (args.entries as u32 + 64).next_power_of_two().max(4_096),
            ipcache_exact: (args.ipcache + 64).next_power_of_two().max(4_096),
            ipcache_lpm: 1_024,
            endpoints: 64,
            ..Capacities::default()
        },
        ..LoadOptions::default()
    })
    .map_err(|e| format!("loading the datapath: {e}"))?;
    // Policy before ipcache (the datapath's ordering contract), both before the programs.
    let adds = policy_entries(&args.ports, args.entries);
    dp.apply_policy_diff(ENDPOINT, &adds, &[])
        .map_err(|e| format!("policy entries: {e}"))?;
    for i in 0..args.ipcache {
        // 172.16.0.0/12 addresses, spread over the filler identities.
        let ip = Ipv4Addr::from(0xac10_0000u32 + i);
        let identity = SERVER_IDENTITY + 1 + i % (args.entries as u32 / 3).max(1);
        dp.upsert_ipcache(IpNet::V4(Ipv4Net::new(ip, 32).unwrap()), identity)
            .map_err(|e| format!("ipcache {ip}: {e}"))?;
    }
    for (prefix, identity) in [
        ("0.0.0.0/0", 2u32),
        ("192.168.0.0/16", SERVER_IDENTITY + 1),
        ("198.18.0.0/15", SERVER_IDENTITY + 2),
    ] {
        dp.upsert_ipcache(prefix.parse().unwrap(), identity)
            .map_err(|e| format!("ipcache {prefix}: {e}"))?;
    }
    dp.upsert_ipcache(
        IpNet::V4(Ipv4Net::new(args.server, 32).unwrap()),
        SERVER_IDENTITY,
    )
    .map_err(|e| format!("ipcache {}: {e}", args.server))?;
    dp.attach_endpoint(
        &args.ifname,
        EndpointSpec {
            id: ENDPOINT,
            identity: ENDPOINT_IDENTITY,
            flags: EndpointFlags {
                audit: false,
                enforce_ingress: true,
                enforce_egress: true,
            },
        },
    )
    .map_err(|e| format!("attaching to {}: {e}", args.ifname))?;
    Ok(dp)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread exists: setns applies to the calling thread, the mask is inherited.
    if let Err(e) = enter_netns(&args.netns) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let set = block_signals();
    let _ = ebpf::remove_pins(&args.pin);
    let dp = match setup(&args) {
        Ok(dp) => dp,
        Err(e) => {
            eprintln!("bench_endpoint: {e}");
            let _ = ebpf::remove_pins(&args.pin);
            return ExitCode::FAILURE;
        }
    };
    println!(
        "ready: {} policy entries, {} ipcache /32 entries, programs on {}",
        dp.policy_len(),
        args.ipcache + 1,
        args.ifname
    );
    let sig = wait_for_signal(&set);
    let mut code = ExitCode::SUCCESS;
    match dp.policy_entries(ENDPOINT) {
        Ok(rows) => {
            for r in rows
                .iter()
                .filter(|r| r.key.identity == SERVER_IDENTITY && r.packets > 0)
            {
                println!(
                    "entry identity {} TCP {}: {} packets, {} bytes",
                    r.key.identity, r.key.port, r.packets, r.bytes
                );
            }
        }
        Err(e) => eprintln!("reading policy counters: {e}"),
    }
    if let Ok(counters) = dp.counters() {
        let line: Vec<String> = counters
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("counters: {}", line.join(" "));
    }
    if let Err(e) = dp.unload() {
        eprintln!("unloading: {e}");
        let _ = ebpf::remove_pins(&args.pin);
        code = ExitCode::FAILURE;
    }
    println!("unloaded after signal {sig}");
    code
}
