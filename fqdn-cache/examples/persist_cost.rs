//! What persisting the learned state costs, the old way and the new, at 100,000 and
//! 1,000,000 learned (name, IP) entries (names × IPs as the memory bench fills them:
//! `host{i}.d{i % 1000}.example.com`, distinct IPv4 addresses, TTL 3600 s).
//!
//! - Old: once a second (whenever anything changed, i.e. always under load) the agent took
//!   `FqdnCache::snapshot` under its state lock, then encoded it as JSON and rewrote the whole
//!   file (write, fsync, rename) with the lock released.
//! - New: a second's changes (20,000 answers refreshing known names: each with all of the
//!   name's IPs, as an answer carries its whole RRset, or 2 of 10 for a name that rotates a
//!   subset — the changed name's lookups are all recorded, so that case writes more) are
//!   taken from the change log, encoded in steps of 256 records under the lock, framed and
//!   appended to the journal with one write and an fdatasync. When the journal outgrows the
//!   snapshot, a compaction copies the cache 512 entries per lock hold and writes the
//!   snapshot's JSON; its cost is spread over the seconds the journal took to grow.
//!
//! "Lock" is the time spent in the cache calls the agent makes under its state lock (the DNS
//! proxy's answers wait on that lock). Files go to a directory under the system temporary
//! directory. Run: `cargo run --release -p fqdn-cache --example persist_cost`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use fqdn_cache::journal::JOURNAL_HEADER;
use fqdn_cache::{
    apply_journal, read_journal, Answer, BatchEncoder, Config, FqdnCache, NoConnections, Snapshot,
    SnapshotChunk, SnapshotCursor, SnapshotWriter, Timestamp,
};
use policy::fqdn::DnsName;

const T0: u64 = 1_795_693_645;
/// As the agent's steps (`ENCODE_STEP`, `SNAPSHOT_STEP` in src/agent/fqdn.rs).
const ENCODE_STEP: usize = 256;
const SNAPSHOT_STEP: usize = 512;
const REFRESHES_PER_SEC: u32 = 20_000;

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn name(i: u32) -> DnsName {
    DnsName::new(&format!("host{i}.d{}.example.com", i % 1000))
}

fn key(ep: u16) -> Option<String> {
    (ep == 1).then(|| "frontend".to_string())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A small deterministic generator (xorshift) for which names are refreshed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}

fn fill(names: u32, per_name: u32) -> FqdnCache {
    let mut c = FqdnCache::new(Config::default());
    let mut ips = Vec::new();
    for i in 0..names {
        ips.clear();
        ips.extend((0..per_name).map(|k| addr(i * per_name + k)));
        c.learn(
            &Answer {
                endpoint: 1,
                qname: &name(i),
                chain: &[],
                ips: &ips,
                ttl: 3600,
            },
            Timestamp::from_unix_secs(T0),
            &NoConnections,
        );
    }
    c
}

/// One second of refreshes: `REFRESHES_PER_SEC` answers for random known names, each with
/// `answer_ips` of the name's IPs (all of them: an answer carries the whole RRset; fewer: a
/// name that rotates a subset), the clock moving on 50 µs per answer (so every refresh moves
/// an expiry).
fn refresh_second(
    c: &mut FqdnCache,
    names: &[DnsName],
    per_name: u32,
    answer_ips: u32,
    second: u64,
    rng: &mut Rng,
) {
    let mut ips = Vec::new();
    for k in 0..REFRESHES_PER_SEC {
        let i = rng.next() % names.len() as u32;
        ips.clear();
        ips.extend((0..answer_ips.min(per_name)).map(|j| addr(i * per_name + j)));
        let now = Timestamp::from_unix_millis((T0 + second) * 1000 + u64::from(k) / 20);
        c.learn(
            &Answer {
                endpoint: 1,
                qname: &names[i as usize],
                chain: &[],
                ips: &ips,
                ttl: 3600,
            },
            now,
            &NoConnections,
        );
    }
}

fn run(names: u32, per_name: u32, answer_ips: u32, dir: &Path) {
    let entries = names * per_name;
    println!(
        "\n== {entries} entries ({names} names x {per_name} IPs), refresh answers with {} of a name's IPs ==",
        answer_ips.min(per_name)
    );
    let name_list: Vec<DnsName> = (0..names).map(name).collect();

    // ---- Old: the whole snapshot under the lock, JSON, full rewrite.
    let old_file = dir.join("old.json");
    {
        let c = fill(names, per_name);
        let mut lock = Duration::ZERO;
        let mut total = Duration::ZERO;
        let rounds = 3;
        let mut bytes_len = 0;
        for _ in 0..rounds {
            let start = Instant::now();
            let snap = c.snapshot(key);
            let held = start.elapsed();
            let bytes = snap.encode();
            drop(snap);
            write_atomic(&old_file, &bytes);
            total += start.elapsed();
            lock += held;
            bytes_len = bytes.len();
        }
        println!(
            "old save (every second under load): lock {} ; total {} (snapshot + JSON + write/fsync/rename of {:.1} MiB); \
             CPU per second of persistence = the total",
            ms(lock / rounds),
            ms(total / rounds),
            bytes_len as f64 / 1048576.0
        );
    }

    // ---- New: change log, journal, compaction in steps. The agent turns the log on once
    // the cache is restored, as here after the fill.
    let mut c = fill(names, per_name);
    c.enable_change_log();

    // Learn cost with and without the log: the same second of refreshes on two caches
    // filled alike, alternately, five rounds each; the medians. The logged cache's log is
    // taken after each round, as the agent does each second.
    let mut plain = fill(names, per_name);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 + round);
        let start = Instant::now();
        refresh_second(
            &mut plain,
            &name_list,
            per_name,
            answer_ips,
            1 + round,
            &mut rng,
        );
        without.push(start.elapsed());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 + round);
        let start = Instant::now();
        refresh_second(
            &mut c,
            &name_list,
            per_name,
            answer_ips,
            1 + round,
            &mut rng,
        );
        with.push(start.elapsed());
        let mut p = c.take_changes();
        c.release_changes(&mut p);
    }
    drop(plain);
    without.sort();
    with.sort();
    let (without, with) = (without[2], with[2]);
    println!(
        "{REFRESHES_PER_SEC} refresh answers (median of 5): {} without the change log, {} with it ({:+.0} ns per answer)",
        ms(without),
        ms(with),
        (with.as_secs_f64() - without.as_secs_f64()) * 1e9 / f64::from(REFRESHES_PER_SEC)
    );

    // One second's flush, over a few seconds of load.
    let journal_path = dir.join("fqdn-cache.journal");
    std::fs::write(&journal_path, JOURNAL_HEADER).unwrap();
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal_path)
        .unwrap();
    let seconds = 5;
    let (mut lock_total, mut lock_max, mut total) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut records = 0;
    let mut batch_bytes = 0;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for s in 0..seconds {
        refresh_second(&mut c, &name_list, per_name, answer_ips, 10 + s, &mut rng);
        let start = Instant::now();
        let t = Instant::now();
        let mut pending = c.take_changes();
        let mut held = t.elapsed();
        let mut max = held;
        let mut batch = BatchEncoder::new([(1, "frontend")]);
        loop {
            batch.reserve(ENCODE_STEP);
            let t = Instant::now();
            let done = c.encode_changes(&mut pending, ENCODE_STEP, &mut batch);
            let d = t.elapsed();
            held += d;
            max = max.max(d);
            if done {
                break;
            }
        }
        let t = Instant::now();
        c.release_changes(&mut pending);
        held += t.elapsed();
        drop(pending);
        records += batch.records();
        let framed = batch.finish();
        batch_bytes += framed.len();
        journal.write_all(&framed).unwrap();
        journal.sync_data().unwrap();
        total += start.elapsed();
        lock_total += held;
        lock_max = lock_max.max(max);
    }
    let n = seconds as u32;
    println!(
        "journal flush per second: {} records, {:.0} KiB; lock {} in all, longest hold {}; total {} (encode + frame + append + fdatasync)",
        records / seconds as usize,
        batch_bytes as f64 / 1024.0 / seconds as f64,
        ms(lock_total / n),
        ms(lock_max),
        ms(total / n),
    );

    // A compaction: the cache copied in steps, the JSON written and synced.
    let snap_path = dir.join("fqdn-cache.json");
    let start = Instant::now();
    let (mut held, mut max, mut steps) = (Duration::ZERO, Duration::ZERO, 0u32);
    let file = std::fs::File::create(snap_path.with_extension("json.tmp")).unwrap();
    let mut w = SnapshotWriter::new(
        std::io::BufWriter::with_capacity(1 << 16, file),
        [(1, "frontend")],
    )
    .unwrap();
    let mut cursor = SnapshotCursor::default();
    let mut chunk = SnapshotChunk::default();
    let now = Timestamp::from_unix_secs(T0 + 20);
    loop {
        chunk.clear();
        let t = Instant::now();
        let done = c.snapshot_chunk(&mut cursor, SNAPSHOT_STEP, now, &mut chunk);
        let d = t.elapsed();
        held += d;
        max = max.max(d);
        steps += 1;
        w.write_chunk(&chunk).unwrap();
        if done {
            break;
        }
    }
    let written = w.entries();
    let f = w.finish().unwrap().into_inner().unwrap();
    f.sync_all().unwrap();
    let snap_len = f.metadata().unwrap().len();
    std::fs::rename(snap_path.with_extension("json.tmp"), &snap_path).unwrap();
    let compaction = start.elapsed();
    assert_eq!(written, entries as usize);
    let per_sec = batch_bytes as f64 / seconds as f64;
    let interval = snap_len as f64 / per_sec;
    println!(
        "compaction: {written} entries, {:.1} MiB in {} ({steps} lock holds: {} in all, longest {}); \
         due when the journal outgrows the snapshot: every {:.0} s at this load, {:.2} ms of CPU per second amortized",
        snap_len as f64 / 1048576.0,
        ms(compaction),
        ms(held),
        ms(max),
        interval,
        compaction.as_secs_f64() * 1e3 / interval,
    );
    println!(
        "new persistence per second at this load: lock {} (longest hold {}), CPU {:.2} ms (flush {} + compaction amortized)",
        ms(lock_total / n + Duration::from_secs_f64(held.as_secs_f64() / interval)),
        ms(lock_max.max(max)),
        (total / n).as_secs_f64() * 1e3 + compaction.as_secs_f64() * 1e3 / interval,
        ms(total / n),
    );

    // Restore: snapshot, journal replayed over it.
    let start = Instant::now();
    let snap = Snapshot::decode(&std::fs::read(&snap_path).unwrap()).unwrap();
    let read = read_journal(&std::fs::read(&journal_path).unwrap());
    assert!(read.problem.is_none());
    let merged = apply_journal(snap, &read.records, now);
    let mut r = FqdnCache::new(Config::default());
    r.restore(&merged, |n| (n == "frontend").then_some(1), now);
    assert_eq!(r.stats().entries, entries as usize);
    println!(
        "restore (snapshot + {} journal records): {}",
        read.records.len(),
        ms(start.elapsed())
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("fqdnwall-persist-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    run(100_000, 1, 1, &dir);
    run(100_000, 10, 10, &dir);
    run(100_000, 10, 2, &dir);
    run(1_000_000, 1, 1, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
}
