//! Per-packet cost of the endpoint program, measured by the kernel (BPF_PROG_TEST_RUN), with
//! 10,000 policy entries and 1k..1M ipcache entries.
//!
//! Runs as root in a private network namespace (its loopback, ifindex 1, is the endpoint the
//! test packets arrive on) with its own pin directory, removed at the end. Prints a Markdown
//! table; `--write FILE` appends it to FILE (bench/RESULTS.md).
//!
//! Paths measured:
//! - established: a TCP segment of a tracked connection (conntrack hit; most packets);
//! - new flow, allowed: each run a new source port, so conntrack misses and the full policy
//!   path (ipcache, policy lookups, conntrack insert) runs; measured one run per syscall, so
//!   the kernel's timer overhead is included: the ARP row (program exits at once, measured
//!   the same way) shows that floor;
//! - denied: a UDP packet no entry allows (full policy path and a drop event).

use std::net::Ipv4Addr;
use std::time::Instant;

use ebpf::testrun::{packet, Program};
use ebpf::{
    AttachKind, BpfDatapath, Capacities, EndpointFlags, EndpointSpec, EntryValue, LoadOptions,
};
use ipnet::{IpNet, Ipv4Net};
use policy::mapstate::MapKey;
use policy::model::Direction;

const EP: u16 = 1;
const POLICY_ENTRIES: u32 = 10_000;
const REPEAT: u32 = 200_000;
const NEW_FLOWS: u32 = 20_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; a file to append to may follow --write.
    let write = args
        .iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1).cloned());
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("prog_cost needs root");
        }
        eprintln!("prog_cost: needs root, skipped");
        return;
    }
    // SAFETY: moves this single-threaded process into a fresh network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let pin =
        std::path::PathBuf::from(format!("/sys/fs/bpf/fqdnwall-bench-{}", std::process::id()));
    let _ = ebpf::remove_pins(&pin);
    let result = std::panic::catch_unwind(|| run(&pin));
    let _ = ebpf::remove_pins(&pin);
    let table = match result {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e),
    };
    println!("{table}");
    if let Some(path) = write {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        f.write_all(table.as_bytes()).unwrap();
    }
}

fn key(identity: u32, protocol: u8, port: u16, prefix_len: u8) -> MapKey {
    MapKey {
        identity,
        direction: Direction::Egress,
        protocol,
        port,
        prefix_len,
    }
}

fn run(pin: &std::path::Path) -> String {
    let sizes = [1_000u32, 10_000, 100_000, 1_000_000];
    let mut rows = Vec::new();
    let client = Ipv4Addr::new(10, 0, 0, 2);
    for &n in &sizes {
        let dp = BpfDatapath::load_or_adopt(&LoadOptions {
            pin_dir: pin.to_path_buf(),
            capacities: Capacities {
                policy: 16_384,
                ipcache_exact: 1_100_000,
                ipcache_lpm: 16_384,
                ..Capacities::default()
            },
            ..LoadOptions::default()
        })
        .expect("load");
        dp.attach(
            1,
            AttachKind::Endpoint,
            EndpointSpec {
                id: EP,
                identity: 300,
                flags: EndpointFlags {
                    audit: false,
                    enforce_ingress: true,
                    enforce_egress: true,
                },
            },
        )
        .expect("attach to the namespace's loopback");
        // 10,000 entries: 2,499 identities x (TCP 80, TCP 443, UDP 53 exact: the hash;
        // TCP 8000-8063: the trie), plus identity-0 entries.
        let mut adds = Vec::new();
        for i in 0..(POLICY_ENTRIES / 4 - 1) {
            for (protocol, port, plen) in [
                (6u8, 80u16, 16u8),
                (6, 443, 16),
                (17, 53, 16),
                (6, 8000, 10),
            ] {
                adds.push((key(1_000 + i, protocol, port, plen), EntryValue::default()));
            }
        }
        for port in [22u16, 25, 110, 143] {
            adds.push((key(0, 6, port, 16), EntryValue::default()));
        }
        dp.apply_policy_diff(EP, &adds, &[]).expect("policy");
        let t0 = Instant::now();
        // n /32 entries (the exact-match hash), identities spread over the policy's.
        for i in 0..n {
            let ip = Ipv4Addr::from(0x0b00_0000u32 + i);
            dp.upsert_ipcache(IpNet::V4(Ipv4Net::new(ip, 32).unwrap()), 1_000 + i % 2_400)
                .expect("ipcache");
        }
        dp.upsert_ipcache("0.0.0.0/0".parse().unwrap(), 9).unwrap();
        dp.upsert_ipcache("12.0.0.0/8".parse().unwrap(), 1_500)
            .unwrap();
        let fill = t0.elapsed();
        let target = Ipv4Addr::from(0x0b00_0000u32 + n / 2);
        let lpm_target = Ipv4Addr::new(12, 1, 2, 3);

        // Established: create the flow once, then measure.
        let syn = packet::tcp4(client, 40_000, target, 443, 0x02);
        let r = dp.test_run(Program::FromEndpoint, &syn, 1).unwrap();
        assert_eq!(r.retval, 0, "the first SYN must be allowed");
        let ack = packet::tcp4(client, 40_000, target, 443, 0x10);
        let est = dp.test_run(Program::FromEndpoint, &ack, REPEAT).unwrap();
        assert_eq!(est.retval, 0);

        // New flows, one run each (distinct source ports).
        let mut new_total = 0u64;
        let mut lpm_total = 0u64;
        for i in 0..NEW_FLOWS {
            let p = packet::tcp4(client, 1_024 + (i % 60_000) as u16, target, 8030, 0x02);
            let r = dp.test_run(Program::FromEndpoint, &p, 1).unwrap();
            assert_eq!(r.retval, 0);
            new_total += u64::from(r.duration_ns);
            let p = packet::tcp4(
                Ipv4Addr::new(10, 0, 1, 2),
                1_024 + (i % 60_000) as u16,
                lpm_target,
                80,
                0x02,
            );
            let r = dp.test_run(Program::FromEndpoint, &p, 1).unwrap();
            assert_eq!(r.retval, 0);
            lpm_total += u64::from(r.duration_ns);
        }
        let mut floor_total = 0u64;
        let arp = packet::arp();
        for _ in 0..NEW_FLOWS {
            floor_total += u64::from(
                dp.test_run(Program::FromEndpoint, &arp, 1)
                    .unwrap()
                    .duration_ns,
            );
        }
        let arp_rep = dp.test_run(Program::FromEndpoint, &arp, REPEAT).unwrap();

        // Denied: UDP 9999 has no entry.
        let denied = packet::udp4(client, 5_000, target, 9_999);
        let d = dp.test_run(Program::FromEndpoint, &denied, REPEAT).unwrap();
        assert_eq!(d.retval, 2, "must be dropped");

        rows.push(format!(
            "| {n:>9} | {:>6} | {:>6} | {:>6} | {:>6} | {:>6} | {:>6} | {:.1} s |",
            est.duration_ns,
            new_total / u64::from(NEW_FLOWS),
            lpm_total / u64::from(NEW_FLOWS),
            floor_total / u64::from(NEW_FLOWS),
            arp_rep.duration_ns,
            d.duration_ns,
            fill.as_secs_f64(),
        ));
        dp.unload().expect("unload");
    }
    let mut out = String::new();
    out.push_str("\n## eBPF datapath: per-packet program cost (BPF_PROG_TEST_RUN)\n\n");
    out.push_str(&format!(
        "`cargo bench -p ebpf --bench prog_cost` ({}), kernel {}, {POLICY_ENTRIES} policy entries \
         for the endpoint (3 exact ports and one port range per identity: the exact ones in the \
         hash, the range in the trie), ipcache of N /32 entries (exact-match hash) plus two LPM prefixes. \
         Nanoseconds per packet as the kernel measures them (JIT on). `established`: \
         {REPEAT} runs of one tracked TCP flow. `new` / `new via LPM`: {NEW_FLOWS} new TCP flows \
         (SYN, distinct source ports; to a port of the identity's range entry, so the hash \
         probe misses and the trie decides; the destination in the exact-match hash, or only in an \
         LPM prefix), one run per syscall: each figure includes the kernel's per-call timer \
         overhead and starts with cold caches; the `floor` column measures that fixed part \
         with a packet the program passes at once (ARP); `ARP xN` is that packet with {REPEAT} \
         runs per call. `denied`: a UDP packet no entry allows (full lookup, drop counter, \
         drop event), {REPEAT} runs.\n\n",
        chrono_like_now(),
        kernel_release(),
    ));
    out.push_str("| ipcache N | established | new | new via LPM | floor (1 run) | ARP xN | denied | ipcache fill |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&r);
        out.push('\n');
    }
    out
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// UTC date of the run (no date crate: days since the epoch by the civil calendar).
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}
