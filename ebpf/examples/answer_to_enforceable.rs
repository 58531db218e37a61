//! DNS answer to enforceable, with the kernel maps: how long the datapath takes to make one
//! new FQDN-derived identity enforceable on 100 endpoints, i.e. what the DNS proxy's
//! response hold waits for after the policy engine has computed the diff.
//!
//! ```text
//! answer_to_enforceable [--endpoints N] [--iterations N]
//! ```
//! Root. Loads the datapath with a private pin directory (removed at the end), fills it
//! with a steady state (every endpoint 50 policy entries, 10,000 ipcache /32 entries), then
//! per iteration, timed: for each endpoint `apply_map_diff` adding the new identity's
//! entries (TCP 443 and TCP 80 egress, as a toFQDNs rule with two ports yields), then
//! `upsert_ipcache` of the answer's IP to that identity (policy maps first, ipcache second:
//! the datapath's ordering contract). Untimed, the identity is removed again so the map
//! sizes stay the same over the run. Also timed on its own: a new IP of an identity that
//! already exists (only the ipcache upsert). Prints a Markdown table: wall-clock
//! percentiles, and the same steps' on-CPU time (the thread's CPU clock), which tells the
//! datapath's own cost apart from waiting for a CPU on a loaded machine.
//!
//! The maps are the same whether or not programs are attached, so no interfaces are
//! needed; packets see each update as soon as its syscall returns.

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebpf::{BpfDatapath, Capacities, EntryValue, LoadOptions};
use ipnet::{IpNet, Ipv4Net};
use policy::mapstate::{MapDiff, MapEntry, MapKey};
use policy::model::Direction;

const ENTRIES_PER_ENDPOINT: u32 = 50;
const IPCACHE_BASE: u32 = 10_000;
const FIRST_FQDN_IDENTITY: u32 = 16_777_216 + 1_000;

fn egress(identity: u32, port: u16) -> MapKey {
    MapKey {
        identity,
        direction: Direction::Egress,
        protocol: 6,
        port,
        prefix_len: 16,
    }
}

fn allow() -> MapEntry {
    MapEntry {
        deny: false,
        proxy_port: 0,
        l7: None,
        rules: Arc::from(Vec::new()),
    }
}

fn host(ip: Ipv4Addr) -> IpNet {
    IpNet::V4(Ipv4Net::new(ip, 32).expect("/32"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// On-CPU time of this thread (user + system, so the syscalls count), in nanoseconds: the
/// part of a wall-clock figure that is the datapath's own work rather than waiting for a CPU
/// on a loaded machine.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock and on-CPU durations of one timed step.
#[derive(Default)]
struct Samples {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Samples {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let c = thread_cpu_ns();
        let t = Instant::now();
        let r = f();
        self.wall.push(t.elapsed());
        self.cpu
            .push(Duration::from_nanos(thread_cpu_ns().saturating_sub(c)));
        r
    }

    /// Markdown cells: p50, p99, p99.9, max of wall clock, then p50, p99 on CPU.
    fn cells(&mut self) -> String {
        self.wall.sort();
        self.cpu.sort();
        format!(
            "{} | {} | {} | {} | {} | {}",
            us(percentile(&self.wall, 0.5)),
            us(percentile(&self.wall, 0.99)),
            us(percentile(&self.wall, 0.999)),
            us(*self.wall.last().expect("samples")),
            us(percentile(&self.cpu, 0.5)),
            us(percentile(&self.cpu, 0.99)),
        )
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

struct Args {
    endpoints: u16,
    iterations: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        endpoints: 100,
        iterations: 2_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--endpoints" => {
                a.endpoints = v.parse().map_err(|e| format!("--endpoints {v}: {e}"))?;
            }
            "--iterations" => {
                a.iterations = v.parse().map_err(|e| format!("--iterations {v}: {e}"))?;
            }
            _ => {
                return Err(format!(
                    "unknown argument {flag} (usage: answer_to_enforceable \
                     [--endpoints N] [--iterations N])"
                ))
            }
        }
    }
    if a.endpoints == 0 || a.iterations == 0 {
        return Err("--endpoints and --iterations must be at least 1".into());
    }
    Ok(a)
}

fn run(dp: &BpfDatapath, args: &Args) -> Result<String, ebpf::Error> {
    let eps: Vec<u16> = (1..=args.endpoints).collect();
    // Steady state: per endpoint 50 entries over identities 1000.., 10,000 ipcache /32.
    for &ep in &eps {
        let adds: Vec<(MapKey, EntryValue)> = (0..ENTRIES_PER_ENDPOINT)
            .map(|i| {
                (
                    egress(1_000 + u32::from(ep) * 7 + i, 443),
                    EntryValue::default(),
                )
            })
            .collect();
        dp.apply_policy_diff(ep, &adds, &[])?;
    }
    for i in 0..IPCACHE_BASE {
        dp.upsert_ipcache(
            host(Ipv4Addr::from(0x0a00_0000 + i)),
            1_000 + i % ENTRIES_PER_ENDPOINT,
        )?;
    }
    let baseline = dp.policy_len();

    let mut new_identity = Samples::default();
    let mut new_ip = Samples::default();
    for i in 0..args.iterations {
        let identity = FIRST_FQDN_IDENTITY + i;
        let ip = Ipv4Addr::from(0x6440_0000 + i); // 100.64.0.0/10
        let diff = MapDiff {
            adds: vec![
                (egress(identity, 443), allow()),
                (egress(identity, 80), allow()),
            ],
            deletes: Vec::new(),
        };
        new_identity.time(|| -> Result<(), ebpf::Error> {
            for &ep in &eps {
                dp.apply_map_diff(ep, &diff)?;
            }
            dp.upsert_ipcache(host(ip), identity)
        })?;

        // A second IP of the same (now existing) identity: the ipcache upsert alone.
        let ip2 = Ipv4Addr::from(0x6480_0000 + i); // 100.128.0.0/10
        new_ip.time(|| dp.upsert_ipcache(host(ip2), identity))?;

        // Untimed: the identity goes again (ipcache first, then the entries).
        dp.delete_ipcache(host(ip))?;
        dp.delete_ipcache(host(ip2))?;
        let gone = MapDiff {
            adds: Vec::new(),
            deletes: vec![egress(identity, 443), egress(identity, 80)],
        };
        for &ep in &eps {
            dp.apply_map_diff(ep, &gone)?;
        }
    }
    if dp.policy_len() != baseline {
        return Err(ebpf::Error::Command(format!(
            "{} policy entries after the run, {baseline} before: the removals failed",
            dp.policy_len()
        )));
    }
    let n = args.endpoints;
    let mut out = String::new();
    out.push_str(&format!(
        "| datapath work ({} iterations; {} endpoints × {} entries and {} ipcache /32 in the maps) | p50 µs | p99 µs | p99.9 µs | max µs | on-CPU p50 µs | on-CPU p99 µs |\n",
        args.iterations, n, ENTRIES_PER_ENDPOINT, IPCACHE_BASE
    ));
    out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    out.push_str(&format!(
        "| new FQDN identity: `apply_map_diff` (2 entries) on {n} endpoints + `upsert_ipcache` | {} |\n",
        new_identity.cells()
    ));
    out.push_str(&format!(
        "| new IP of a known identity: `upsert_ipcache` | {} |\n",
        new_ip.cells()
    ));
    Ok(out)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("answer_to_enforceable: needs root (eBPF maps)");
        return ExitCode::FAILURE;
    }
    let pin = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/fqdnwall-bench-dns-{}",
        std::process::id()
    ));
    let _ = ebpf::remove_pins(&pin);
    let policy = (u32::from(args.endpoints) * (ENTRIES_PER_ENDPOINT + 2) + 64)
        .next_power_of_two()
        .max(4_096);
    let dp = match BpfDatapath::load_or_adopt(&LoadOptions {
        pin_dir: pin.clone(),
        capacities: Capacities {
            policy,
            ipcache_exact: 65_536,
            ipcache_lpm: 1_024,
            endpoints: 1_024,
            ..Capacities::default()
        },
        ..LoadOptions::default()
    }) {
        Ok(dp) => dp,
        Err(e) => {
            eprintln!("loading the datapath: {e}");
            let _ = ebpf::remove_pins(&pin);
            return ExitCode::FAILURE;
        }
    };
    let result = run(&dp, &args);
    let unloaded = dp.unload();
    let _ = ebpf::remove_pins(&pin);
    match (result, unloaded) {
        (Ok(table), Ok(())) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("answer_to_enforceable: {e}");
            ExitCode::FAILURE
        }
        (_, Err(e)) => {
            eprintln!("unloading: {e}");
            ExitCode::FAILURE
        }
    }
}
