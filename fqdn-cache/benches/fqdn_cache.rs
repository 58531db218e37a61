//! FQDN cache costs: memory per learned (name, IP) entry at 1,000,000 entries, learn and
//! lookup at that size, and the pattern index against a linear scan at 10,000 selectors.
//!
//! Memory is measured with a counting global allocator (bytes requested and still live,
//! without the allocator's own overhead) and, as a cross-check, the process's resident set
//! from /proc/self/statm. The counter adds one relaxed atomic add per allocation to every
//! timing below, the same for both sides of each comparison.
// FqdnSelector orders and hashes by its text; clippy sees the regex cache inside it.
#![allow(clippy::mutable_key_type)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, Criterion};
use fqdn_cache::{Answer, Config, FqdnCache, NoConnections, PatternIndex, Timestamp};
use policy::fqdn::{DnsName, FqdnPattern};
use policy::model::FqdnSelector;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

const T0: u64 = 1_795_693_645;

fn now() -> Timestamp {
    Timestamp::from_unix_secs(T0)
}

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn name(i: u32) -> DnsName {
    DnsName::new(&format!("host{i}.d{}.example.com", i % 1000))
}

/// 10,000 selectors of the shapes real policies use.
fn selectors(n: u32) -> Vec<FqdnSelector> {
    (0..n)
        .map(|i| {
            let d = i / 4;
            let text = match i % 10 {
                0..=3 => {
                    return FqdnSelector::MatchName(
                        DnsName::parse_match_name(&format!("api{i}.d{d}.example.com")).unwrap(),
                    )
                }
                4..=7 => format!("*.d{i}.example.com"),
                8 => format!("**.sub{i}.example.org"),
                _ => format!("api-*.n{i}.example.net"),
            };
            FqdnSelector::MatchPattern(FqdnPattern::parse(&text).unwrap())
        })
        .collect()
}

/// A cache with the 10,000 selectors in force.
fn with_selectors() -> FqdnCache {
    let mut cache = FqdnCache::new(Config::default());
    cache.set_selectors(selectors(10_000).into_iter().collect::<BTreeSet<_>>());
    cache
}

/// Learns `names × ips_per_name` entries for endpoint 1.
fn fill(cache: &mut FqdnCache, names: u32, ips_per_name: u32) {
    let mut ips = Vec::with_capacity(ips_per_name as usize);
    for i in 0..names {
        ips.clear();
        ips.extend((0..ips_per_name).map(|k| addr(i * ips_per_name + k)));
        let ch = cache.learn(
            &Answer {
                endpoint: 1,
                qname: &name(i),
                chain: &[],
                ips: &ips,
                ttl: 3600,
            },
            now(),
            &NoConnections,
        );
        black_box(ch);
    }
}

fn report_memory(names: u32, ips_per_name: u32) {
    let before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss_bytes();
    let mut cache = with_selectors();
    let selectors_live = LIVE.load(Ordering::Relaxed) - before;
    let rss_selectors = rss_bytes().saturating_sub(rss_before);
    let start = std::time::Instant::now();
    fill(&mut cache, names, ips_per_name);
    let took = start.elapsed();
    let live = LIVE.load(Ordering::Relaxed) - before - selectors_live;
    let rss = rss_bytes().saturating_sub(rss_before + rss_selectors);
    let stats = cache.stats();
    assert_eq!(stats.entries, (names * ips_per_name) as usize);
    let entries = stats.entries as f64;
    println!(
        "memory {names} names x {ips_per_name} IPs = {} entries ({} identities): \
         {:.1} MiB live heap ({:.1} bytes/entry), RSS +{:.1} MiB ({:.1} bytes/entry); \
         filled in {:.2} s ({:.0} ns/entry); the 10,000 selectors themselves: {:.1} MiB live heap",
        stats.entries,
        stats.identities,
        live as f64 / 1048576.0,
        live as f64 / entries,
        rss as f64 / 1048576.0,
        rss as f64 / entries,
        took.as_secs_f64(),
        took.as_nanos() as f64 / entries,
        selectors_live as f64 / 1048576.0,
    );
    drop(cache);
}

fn bench_cache(c: &mut Criterion) {
    let mut cache = with_selectors();
    fill(&mut cache, 100_000, 10);
    let mut group = c.benchmark_group("cache_1M_entries");
    // Names built beforehand so the timings are the cache's, not the formatting's.
    let names: Vec<DnsName> = (0..100_000).map(name).collect();
    let fresh: Vec<DnsName> = (0..100_000)
        .map(|k| DnsName::new(&format!("x{k}.d5.example.com")))
        .collect();

    // A repeated query: the same name and IPs again (the common case).
    let mut i = 0u32;
    group.bench_function("learn_repeat_answer_2_ips", |b| {
        b.iter(|| {
            i = (i + 1) % 100_000;
            let ips = [addr(i * 10), addr(i * 10 + 1)];
            black_box(cache.learn(
                &Answer {
                    endpoint: 1,
                    qname: &names[i as usize],
                    chain: &[],
                    ips: &ips,
                    ttl: 3600,
                },
                now(),
                &NoConnections,
            ))
        })
    });

    // A new name with 2 new IPs matched by a selector (ipcache upserts), then its expiry
    // (ipcache deletes): the full lifecycle, keeping the cache at its size.
    let mut k = 0u64;
    group.bench_function("learn_new_name_then_expire", |b| {
        b.iter(|| {
            k += 1;
            let t = Timestamp::from_unix_secs(T0 + k);
            let q = &fresh[(k % 100_000) as usize];
            let ips = [
                addr(2_000_000 + (k % 1_000_000) as u32 * 2),
                addr(2_000_001 + (k % 1_000_000) as u32 * 2),
            ];
            black_box(cache.learn(
                &Answer {
                    endpoint: 1,
                    qname: q,
                    chain: &[],
                    ips: &ips,
                    ttl: 1,
                },
                t,
                &NoConnections,
            ));
            black_box(cache.expire(t.add_secs(1), &NoConnections))
        })
    });

    let mut j = 0u32;
    group.bench_function("lookup_name", |b| {
        b.iter(|| {
            j = (j + 7919) % 100_000;
            black_box(cache.lookup(1, &names[j as usize]))
        })
    });
    // A policy change adding one selector that matches 1,332 learned names (13,320 IPs) and
    // the next one removing it: each call re-indexes the 10,000 selectors, matches every
    // learned name against the change, and moves the affected IPs to their new identity.
    let base: BTreeSet<FqdnSelector> = selectors(10_000).into_iter().collect();
    let mut with_extra = base.clone();
    with_extra.insert(FqdnSelector::MatchPattern(
        FqdnPattern::parse("host1*.d1*.example.com").unwrap(),
    ));
    let mut added = false;
    group.sample_size(10);
    group.bench_function("set_selectors_add_or_remove_one", |b| {
        b.iter(|| {
            added = !added;
            let sels = if added { &with_extra } else { &base };
            black_box(cache.set_selectors(sels.clone()))
        })
    });
    group.sample_size(100);
    group.bench_function("identity_of_ip", |b| {
        b.iter(|| {
            j = (j + 7919) % 1_000_000;
            black_box(cache.identity_of(addr(j)))
        })
    });
    group.finish();
}

fn bench_index(c: &mut Criterion) {
    let sels = selectors(10_000);
    let index = PatternIndex::new(sels.iter().enumerate().map(|(i, s)| (i as u32, s)));
    // Half the names match some selector, half match none.
    let names: Vec<DnsName> = (0..1000u32)
        .map(|i| match i % 4 {
            0 => DnsName::new(&format!("api{}.d{}.example.com", i * 10, i * 10 / 4)),
            1 => DnsName::new(&format!("www.d{}.example.com", i * 10 + 4)),
            2 => DnsName::new(&format!("host{i}.unrelated.example.io")),
            _ => DnsName::new(&format!("a.b.c{i}.example.org")),
        })
        .collect();
    for n in names.iter().take(2) {
        assert!(!index.matches(n).is_empty(), "{n} should match");
    }
    let mut group = c.benchmark_group("selectors_10k");
    let mut i = 0usize;
    group.bench_function("index", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            i = (i + 1) % names.len();
            out.clear();
            index.matches_into(&names[i], &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("linear_scan", |b| {
        b.iter(|| {
            i = (i + 1) % names.len();
            black_box(sels.iter().filter(|s| s.matches(&names[i])).count())
        })
    });
    group.finish();
}

criterion_group!(benches, bench_index, bench_cache);

fn main() {
    report_memory(100_000, 10);
    report_memory(1_000_000, 1);
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
