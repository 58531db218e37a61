//! The change log and the journal through the public API: coalescing, a snapshot written in
//! steps while the cache changes plus the journal restores exactly the live contents, and
//! expired entries stay behind.
// FqdnSelector orders and hashes by its text; clippy sees the regex cache inside it.
#![allow(clippy::mutable_key_type)]

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use fqdn_cache::journal::JOURNAL_HEADER;
use fqdn_cache::{
    apply_journal, read_journal, Answer, BatchEncoder, Config, ConnectionSource, EndpointId,
    EntryState, FqdnCache, ListEntry, NoConnections, Snapshot, SnapshotChunk, SnapshotCursor,
    SnapshotWriter, Timestamp,
};
use policy::fqdn::{DnsName, FqdnPattern};
use policy::model::FqdnSelector;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix_secs(1_795_693_645 + secs)
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn learn(c: &mut FqdnCache, ep: EndpointId, q: &str, ips: &[&str], ttl: u32, now: Timestamp) {
    learn_with(c, ep, q, ips, ttl, now, &NoConnections);
}
fn learn_with(
    c: &mut FqdnCache,
    ep: EndpointId,
    q: &str,
    ips: &[&str],
    ttl: u32,
    now: Timestamp,
    conns: &dyn ConnectionSource,
) {
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    c.learn(
        &Answer {
            endpoint: ep,
            qname: &DnsName::new(q),
            chain: &[],
            ips: &ips,
            ttl,
        },
        now,
        conns,
    );
}
const ENDPOINTS: [(EndpointId, &str); 2] = [(1, "frontend"), (2, "backend")];
fn resolve(name: &str) -> Option<EndpointId> {
    ENDPOINTS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(id, _)| *id)
}
fn all() -> BTreeSet<FqdnSelector> {
    [FqdnSelector::MatchPattern(FqdnPattern::parse("*").unwrap())]
        .into_iter()
        .collect()
}
fn logged(config: Config) -> FqdnCache {
    let mut c = FqdnCache::new(config);
    c.set_selectors(all());
    c.enable_change_log();
    c
}

/// Takes the cache's log and encodes it as one framed batch, `step` records at a time,
/// calling `between` after each step (the cache changing while the agent's lock is free).
fn drain_with(
    c: &mut FqdnCache,
    step: usize,
    mut between: impl FnMut(&mut FqdnCache),
) -> Option<Vec<u8>> {
    let mut pending = c.take_changes();
    let mut batch = BatchEncoder::new(ENDPOINTS);
    while !c.encode_changes(&mut pending, step, &mut batch) {
        between(c);
    }
    c.release_changes(&mut pending);
    (!batch.is_empty()).then(|| batch.finish())
}
fn drain(c: &mut FqdnCache) -> Option<Vec<u8>> {
    drain_with(c, usize::MAX, |_| {})
}

/// The snapshot in steps of `step` entries, calling `between` after each step.
fn snapshot_with(
    c: &mut FqdnCache,
    step: usize,
    now: Timestamp,
    mut between: impl FnMut(&mut FqdnCache),
) -> Vec<u8> {
    let mut w = SnapshotWriter::new(Vec::new(), ENDPOINTS).unwrap();
    let mut cursor = SnapshotCursor::default();
    let mut chunk = SnapshotChunk::default();
    loop {
        chunk.clear();
        let done = c.snapshot_chunk(&mut cursor, step, now, &mut chunk);
        w.write_chunk(&chunk).unwrap();
        if done {
            break;
        }
        between(c);
    }
    w.finish().unwrap()
}

/// A cache restored from snapshot bytes and journal bytes, as the agent restores.
fn restored(snapshot: &[u8], journal: &[u8], now: Timestamp, config: Config) -> FqdnCache {
    let snap = Snapshot::decode(snapshot).unwrap();
    let read = read_journal(journal);
    assert!(read.problem.is_none(), "{:?}", read.problem);
    let merged = apply_journal(snap, &read.records, now);
    let mut r = FqdnCache::new(config);
    r.set_selectors(all());
    r.restore(&merged, resolve, now);
    r
}

/// What `fqdn cache list` shows, as comparable text.
fn contents(c: &FqdnCache) -> Vec<String> {
    c.list(None, None).iter().map(row).collect()
}

/// One entry of `fqdn cache list` as comparable text.
fn row(e: &ListEntry) -> String {
    format!(
        "{} {} {:?} {} {}",
        e.endpoint,
        e.name,
        e.ips,
        e.expires,
        e.source.as_str()
    )
}

fn empty_snapshot() -> Vec<u8> {
    SnapshotWriter::new(Vec::new(), ENDPOINTS)
        .unwrap()
        .finish()
        .unwrap()
}

#[test]
fn a_hot_name_refreshed_a_thousand_times_is_one_record() {
    let mut c = logged(Config::default());
    for i in 0..1000 {
        learn(
            &mut c,
            1,
            "hot.example.com",
            &["192.0.2.1"],
            60,
            Timestamp::from_unix_millis(t(0).as_unix_millis() + i),
        );
    }
    learn(&mut c, 1, "other.example.com", &["192.0.2.2"], 60, t(0));
    let mut pending = c.take_changes();
    assert_eq!(pending.len(), 2);
    let mut batch = BatchEncoder::new(ENDPOINTS);
    assert!(c.encode_changes(&mut pending, 10, &mut batch));
    c.release_changes(&mut pending);
    let mut bytes = JOURNAL_HEADER.to_vec();
    bytes.extend(batch.finish());
    let read = read_journal(&bytes);
    assert_eq!(read.records.len(), 2);
    let hot = read
        .records
        .iter()
        .find(|r| r.name == "hot.example.com.")
        .unwrap();
    // The last refresh's expiry.
    assert_eq!(
        hot.state,
        EntryState::Lookup {
            expires: Timestamp::from_unix_millis(t(60).as_unix_millis() + 999)
        }
    );
    // The log starts empty again; a refresh that moves no expiry is not a change.
    assert!(c.take_changes().is_empty());
    learn(&mut c, 1, "other.example.com", &["192.0.2.2"], 60, t(0));
    assert!(c.take_changes().is_empty());
    learn(&mut c, 1, "other.example.com", &["192.0.2.2"], 60, t(1));
    assert_eq!(c.take_changes().len(), 1);
}

#[test]
fn without_the_log_nothing_is_logged() {
    let mut c = FqdnCache::new(Config::default());
    learn(&mut c, 1, "a.example.com", &["192.0.2.1"], 60, t(0));
    assert!(c.take_changes().is_empty());
}

#[test]
fn snapshot_in_steps_plus_journal_restores_the_live_contents() {
    let config = Config {
        min_ttl: 0,
        max_ips_per_hostname: 3,
        zombie_recheck_secs: 5,
    };
    let mut c = logged(config);
    let open: HashSet<(EndpointId, IpAddr)> = [(1, ip("192.0.2.20")), (2, ip("192.0.2.31"))].into();
    for i in 0..20u32 {
        let name = format!("n{i}.example.com");
        let a = format!("192.0.2.{i}");
        learn(
            &mut c,
            1 + (i % 2) as EndpointId,
            &name,
            &[&a],
            60 + i,
            t(0),
        );
    }
    learn(&mut c, 1, "z.example.com", &["192.0.2.20"], 5, t(0));
    learn(
        &mut c,
        2,
        "y.example.com",
        &["192.0.2.31", "2001:db8::1"],
        5,
        t(0),
    );
    // An IP with an open connection outlives its lookup as a zombie; one without goes.
    c.expire(t(5), &open);
    assert_eq!(c.stats().zombies, 2);
    // An endpoint the snapshot cannot name (restore skips it either way).
    learn(&mut c, 9, "unnamed.example.com", &["192.0.2.99"], 60, t(5));

    // A journal from the start: one batch so far.
    let mut journal = JOURNAL_HEADER.to_vec();
    journal.extend(drain(&mut c).unwrap());

    // A compaction: the snapshot is taken two entries at a time while the cache changes
    // between steps, and batches keep being appended (ticks) while it runs.
    let from = journal.len();
    let mut step = 0;
    let mut ticks: Vec<Vec<u8>> = Vec::new();
    let snapshot = snapshot_with(&mut c, 2, t(6), |c| {
        step += 1;
        let now = t(6 + step);
        match step {
            // Refreshed after its step passed: a later expiry.
            3 => learn(c, 1, "n0.example.com", &["192.0.2.0"], 300, now),
            // A new name and a name forgotten (its id is freed).
            4 => {
                learn(c, 2, "new.example.com", &["198.51.100.1"], 120, now);
                c.clean(
                    Some(1),
                    Some(&FqdnSelector::MatchName(DnsName::new("n2.example.com"))),
                );
            }
            // Forgotten, then learned again with a shorter lifetime.
            5 => {
                c.clean(
                    Some(2),
                    Some(&FqdnSelector::MatchName(DnsName::new("n3.example.com"))),
                );
                learn(c, 2, "n3.example.com", &["192.0.2.3"], 40, now);
            }
            // Over maxIPsPerHostname: the earliest-expiring IP is evicted, and stays as a
            // zombie (a connection to it is open).
            6 => learn_with(
                c,
                1,
                "n4.example.com",
                &["203.0.113.1", "203.0.113.2", "203.0.113.3"],
                600,
                now,
                &|ep: EndpointId, a: IpAddr| ep == 1 && a == ip("192.0.2.4"),
            ),
            // A zombie learned again is a lookup again.
            7 => learn(c, 1, "z.example.com", &["192.0.2.20"], 90, now),
            _ => {}
        }
        if step % 3 == 0 {
            // A tick during the compaction; the cache changes between its encoding steps
            // too (a name freed after the log was taken is still encoded by its name).
            let batch = drain_with(c, 1, |c| {
                c.clean(
                    None,
                    Some(&FqdnSelector::MatchName(DnsName::new("n5.example.com"))),
                );
            });
            ticks.extend(batch);
        }
    });
    for b in &ticks {
        journal.extend(b);
    }
    // After the snapshot's last step, before the compaction finishes.
    learn(&mut c, 1, "late.example.com", &["192.0.2.200"], 60, t(40));
    journal.extend(drain(&mut c).unwrap());
    let now = t(41);

    // The new journal: the header and what was appended since the steps began.
    let mut new_journal = JOURNAL_HEADER.to_vec();
    new_journal.extend_from_slice(&journal[from..]);
    let live = contents(&c);
    assert!(live.iter().any(|l| l.contains("new.example.com")));
    assert!(!live.iter().any(|l| l.contains("n2.example.com")));
    assert!(!live.iter().any(|l| l.contains("n5.example.com")));
    assert!(live.iter().any(|l| l.starts_with("2 n3.example.com.")));
    assert!(live
        .iter()
        .any(|l| l.starts_with("1 n4.example.com. [192.0.2.4]") && l.ends_with("zombie")));
    let without_unnamed: Vec<String> = live
        .iter()
        .filter(|l| !l.starts_with("9 "))
        .cloned()
        .collect();

    // After the compaction.
    let r = restored(&snapshot, &new_journal, now, config);
    assert_eq!(contents(&r), without_unnamed);
    // A crash between the snapshot's rename and the journal's: the whole old journal over
    // the new snapshot.
    let r = restored(&snapshot, &journal, now, config);
    assert_eq!(contents(&r), without_unnamed);
    // A crash before the rename: the old snapshot (empty here) and the whole journal.
    let r = restored(&empty_snapshot(), &journal, now, config);
    assert_eq!(contents(&r), without_unnamed);
    // The journal alone is not enough: the snapshot's part is needed.
    let r = restored(&empty_snapshot(), &new_journal, now, config);
    assert_ne!(contents(&r), without_unnamed);
}

#[test]
fn expired_entries_are_not_restored() {
    let mut c = logged(Config::default());
    learn(&mut c, 1, "short.example.com", &["192.0.2.1"], 5, t(0));
    learn(&mut c, 1, "long.example.com", &["192.0.2.2"], 60, t(0));
    let snapshot = snapshot_with(&mut c, 100, t(0), |_| {});
    learn(
        &mut c,
        2,
        "journal-short.example.com",
        &["192.0.2.3"],
        5,
        t(1),
    );
    learn(
        &mut c,
        2,
        "journal-long.example.com",
        &["192.0.2.4"],
        60,
        t(1),
    );
    let mut journal = JOURNAL_HEADER.to_vec();
    journal.extend(drain(&mut c).unwrap());

    let r = restored(&snapshot, &journal, t(10), Config::default());
    let names: Vec<String> = r
        .list(None, None)
        .into_iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(names, ["long.example.com.", "journal-long.example.com."]);
    // A compaction at that time leaves the expired ones out of the new snapshot too (the
    // expiry timer may not have run yet).
    let compacted = snapshot_with(&mut c, 100, t(10), |_| {});
    let s = String::from_utf8(compacted).unwrap();
    assert!(!s.contains("short"), "{s}");
    assert!(s.contains("journal-long.example.com."), "{s}");
}

mod random {
    //! Random learning, cleaning, expiry and zombies, with ticks (journal batches) and a
    //! compaction (snapshot steps) interleaved: whenever it is checked, the snapshot plus
    //! the journal restore exactly what the cache holds.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Learn {
            ep: EndpointId,
            name: u8,
            ips: Vec<u8>,
            ttl: u32,
            open: bool,
        },
        Clean {
            ep: Option<EndpointId>,
            name: Option<u8>,
        },
        /// The clock moves on and lifetimes end (IPs with an open connection: zombies).
        Expire {
            secs: u64,
            open: Vec<u8>,
        },
        Tick,
        SnapshotStep,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u16..=2, 0u8..6, proptest::collection::vec(0u8..6, 1..4), prop_oneof![Just(1u32), Just(5), Just(60)], any::<bool>())
                .prop_map(|(ep, name, ips, ttl, open)| Op::Learn { ep, name, ips, ttl, open }),
            1 => (proptest::option::of(1u16..=2), proptest::option::of(0u8..6))
                .prop_map(|(ep, name)| Op::Clean { ep, name }),
            2 => (0u64..4, proptest::collection::vec(0u8..6, 0..3))
                .prop_map(|(secs, open)| Op::Expire { secs, open }),
            2 => Just(Op::Tick),
            3 => Just(Op::SnapshotStep),
        ]
    }

    fn a(i: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, i])
    }
    fn n(i: u8) -> String {
        format!("n{i}.example.com")
    }

    /// The live contents as a restore at `now` would have them: lookups expired by the
    /// clock but not yet by `expire` are left out.
    fn alive(c: &FqdnCache, now: Timestamp) -> Vec<String> {
        c.list(None, None)
            .iter()
            .filter(|e| e.source.as_str() == "zombie" || e.expires > now)
            .map(row)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn snapshot_plus_journal_is_the_cache(ops in proptest::collection::vec(op(), 1..60)) {
            let config = Config { min_ttl: 0, max_ips_per_hostname: 2, zombie_recheck_secs: 5 };
            let mut c = logged(config);
            let mut now = t(0);
            let mut snapshot = empty_snapshot();
            let mut journal = JOURNAL_HEADER.to_vec();
            // Every batch ever appended, never cut by a compaction.
            let mut full = JOURNAL_HEADER.to_vec();
            // A compaction under way: its writer, cursor, and the journal length it began at.
            let mut compaction: Option<(SnapshotWriter<Vec<u8>>, SnapshotCursor, usize)> = None;
            for op in ops {
                match op {
                    Op::Learn { ep, name, ips, ttl, open } => {
                        let ips: Vec<String> = ips.iter().map(|i| a(*i).to_string()).collect();
                        let ips: Vec<&str> = ips.iter().map(|s| s.as_str()).collect();
                        learn_with(&mut c, ep, &n(name), &ips, ttl, now, &move |_: EndpointId, _: IpAddr| open);
                    }
                    Op::Clean { ep, name } => {
                        let sel = name.map(|i| FqdnSelector::MatchName(DnsName::new(&n(i))));
                        c.clean(ep, sel.as_ref());
                    }
                    Op::Expire { secs, open } => {
                        now = now.add_secs(secs as u32);
                        let open: HashSet<(EndpointId, IpAddr)> =
                            open.iter().flat_map(|i| [(1, a(*i)), (2, a(*i))]).collect();
                        c.expire(now, &open);
                    }
                    Op::Tick => {
                        // Encoded in steps of one record, the cache changing in between.
                        let batch = drain_with(&mut c, 1, |c| {
                            learn(c, 1, "between.example.com", &["198.51.100.1"], 60, now);
                        });
                        let batch = batch.unwrap_or_default();
                        journal.extend(&batch);
                        full.extend(batch);
                    }
                    Op::SnapshotStep => {
                        let (mut w, mut cursor, from) = compaction.take().unwrap_or_else(|| {
                            (SnapshotWriter::new(Vec::new(), ENDPOINTS).unwrap(), SnapshotCursor::default(), journal.len())
                        });
                        let mut chunk = SnapshotChunk::default();
                        let done = c.snapshot_chunk(&mut cursor, 2, now, &mut chunk);
                        w.write_chunk(&chunk).unwrap();
                        if done {
                            snapshot = w.finish().unwrap();
                            let mut tail = JOURNAL_HEADER.to_vec();
                            tail.extend_from_slice(&journal[from..]);
                            journal = tail;
                        } else {
                            compaction = Some((w, cursor, from));
                        }
                    }
                }
            }
            // A last tick, then restore at the cache's clock.
            let batch = drain(&mut c).unwrap_or_default();
            journal.extend(&batch);
            full.extend(batch);
            let live = alive(&c, now);
            let r = restored(&snapshot, &journal, now, config);
            prop_assert_eq!(contents(&r), live.clone());
            // A crash between the snapshot's rename and the journal's: the new snapshot with
            // every batch before it too.
            let r = restored(&snapshot, &full, now, config);
            prop_assert_eq!(contents(&r), live.clone());
            // The first (empty) base with every batch.
            let r = restored(&empty_snapshot(), &full, now, config);
            prop_assert_eq!(contents(&r), live);
        }
    }
}
