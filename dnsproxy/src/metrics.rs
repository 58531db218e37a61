//! Counters and histograms of the proxy, lock-free (atomics) so the hot path never waits on
//! them. The agent reads snapshots and exports them as Prometheus metrics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, Ordering::Relaxed};
use std::time::Duration;

/// How the policy judged a query, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed,
    Denied,
    UnknownEndpoint,
    /// Not judged: malformed or not a standard query (answered FORMERR/NOTIMP).
    Invalid,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Allowed,
        Verdict::Denied,
        Verdict::UnknownEndpoint,
        Verdict::Invalid,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::UnknownEndpoint => "unknown_endpoint",
            Verdict::Invalid => "invalid",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Rcode label slots: the six common rcodes, any other, and "no reply".
const RCODE_LABELS: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER", "NOREPLY",
];

fn rcode_slot(rcode: Option<u16>) -> usize {
    match rcode {
        Some(r @ 0..=5) => r as usize,
        Some(_) => 6,
        None => 7,
    }
}

/// A histogram with fixed bucket bounds (upper bounds, inclusive), like Prometheus'.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    buckets: Vec<Counter>,
    sum_us: Counter,
    count: Counter,
}

/// Slots of a [`Counter`]: one each for the first threads to count, one shared by the rest
/// (still correct, a little slower).
const COUNTER_SLOTS: usize = 8;

static NEXT_COUNTER_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot in every [`Counter`], handed out in turn on first use, and whether
    /// the thread has it to itself: the first `COUNTER_SLOTS - 1` threads to count do (the
    /// proxy's shards are among the first); every later one shares the last slot.
    static COUNTER_SLOT: (usize, bool) = {
        let n = NEXT_COUNTER_SLOT.fetch_add(1, Relaxed);
        if n < COUNTER_SLOTS - 1 {
            (n, true)
        } else {
            (COUNTER_SLOTS - 1, false)
        }
    };
}

/// A slot on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct CounterSlot(AtomicU64);

/// A counter that threads add to without sharing a cache line: each thread writes its own
/// slot and a reader sums them. The proxy's shards count every query; with one shared atomic
/// the line would travel between cores on every count. Same calls as an `AtomicU64`.
#[derive(Debug)]
pub struct Counter {
    slots: Box<[CounterSlot; COUNTER_SLOTS]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new(0)
    }
}

/// The ordering a plain store may take for what a read-modify-write was asked to do.
fn order_for_store(order: Ordering) -> Ordering {
    match order {
        Ordering::Relaxed | Ordering::Acquire => Ordering::Relaxed,
        Ordering::SeqCst => Ordering::SeqCst,
        _ => Ordering::Release,
    }
}

impl Counter {
    pub fn new(value: u64) -> Counter {
        let slots: Box<[CounterSlot; COUNTER_SLOTS]> = Box::default();
        slots[0].0.store(value, Relaxed);
        Counter { slots }
    }

    /// Adds `n` (wrapping) to this thread's slot. A slot only this thread writes needs no
    /// read-modify-write: a load and a store (no bus lock; readers still see whole values).
    fn add(&self, n: u64, order: Ordering) {
        self.add_in(COUNTER_SLOT.with(|s| *s), n, order);
    }

    /// [`Counter::add`] with the thread's slot looked up already (several counts at once).
    fn add_in(&self, (slot, exclusive): (usize, bool), n: u64, order: Ordering) {
        let slot = &self.slots[slot].0;
        if exclusive {
            slot.store(slot.load(Relaxed).wrapping_add(n), order_for_store(order));
        } else {
            slot.fetch_add(n, order);
        }
    }

    pub fn fetch_add(&self, n: u64, order: Ordering) {
        self.add(n, order);
    }

    /// For gauges: a slot may go below zero on its own; the sum does not.
    pub fn fetch_sub(&self, n: u64, order: Ordering) {
        self.add(n.wrapping_neg(), order);
    }

    /// The sum of the slots (wrapping, so a gauge's slots add up right).
    pub fn load(&self, order: Ordering) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.0.load(order)))
    }
}

/// Bucket bounds in microseconds: fine below a millisecond (the hold-time goal lives there),
/// coarse up to the forward timeout.
const BOUNDS_US: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            bounds_us: BOUNDS_US,
            buckets: (0..=BOUNDS_US.len()).map(|_| Counter::new(0)).collect(),
            sum_us: Counter::new(0),
            count: Counter::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        // In 64 bits (as_micros divides 128-bit numbers): saturates after 584,000 years.
        let us = d
            .as_secs()
            .saturating_mul(1_000_000)
            .saturating_add(u64::from(d.subsec_micros()));
        // From the small end: the proxy's times fall in the first few buckets.
        let i = self
            .bounds_us
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(self.bounds_us.len());
        let slot = COUNTER_SLOT.with(|s| *s);
        self.buckets[i].add_in(slot, 1, Relaxed);
        self.sum_us.add_in(slot, us, Relaxed);
        self.count.add_in(slot, 1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            let le = self.bounds_us.get(i).map(|&us| us as f64 / 1e6);
            cumulative.push((le, acc));
        }
        HistogramSnapshot {
            buckets: cumulative,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
            count: self.count.load(Relaxed),
        }
    }
}

/// A histogram read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, `None` = +Inf; cumulative count), as Prometheus wants them.
    pub buckets: Vec<(Option<f64>, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl HistogramSnapshot {
    /// The upper bound (seconds) of the bucket holding quantile `q` (0..=1); `None` if empty or
    /// beyond the last finite bound.
    pub fn quantile_upper_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .and_then(|(le, _)| *le)
    }
}

/// Everything the proxy counts.
#[derive(Debug)]
pub struct ProxyMetrics {
    queries: [[Counter; 8]; 4],
    /// Datagrams or TCP frames that were not answerable DNS queries (too short, a response,
    /// unparsable header): dropped without a reply.
    pub malformed_dropped: Counter,
    /// Answers from upstream that matched no outstanding query (wrong source, unknown ID,
    /// other question): ignored.
    pub upstream_mismatches: Counter,
    /// Queries whose upstream did not answer within forwardTimeout (the client got no reply).
    pub upstream_timeouts: Counter,
    /// Queries that failed upstream otherwise (unreachable, refused connection, malformed answer),
    /// answered SERVFAIL.
    pub upstream_failures: Counter,
    /// Responses released because responseMaxDelay passed before the datapath confirmed.
    pub hold_timeouts: Counter,
    /// Responses released although the datapath reported it could not take the entries.
    pub hold_failures: Counter,
    /// TCP connections closed at accept because tcpMaxConnections were open.
    pub tcp_rejected: Counter,
    /// TCP connections open now.
    pub tcp_open: Counter,
    /// UDP receiving threads at realtime priority now (`ProxyConfig::realtime_priority`).
    pub realtime_threads: Counter,
    /// Times the receiving threads went back to normal priority, over their CPU or rate
    /// budget at realtime priority.
    pub realtime_demotions: Counter,
    /// Time from sending a query upstream to its answer.
    pub upstream_latency: Histogram,
    /// Time a response was held waiting for the datapath (only responses that taught IPs).
    pub hold_time: Histogram,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            queries: Default::default(),
            malformed_dropped: Counter::new(0),
            upstream_mismatches: Counter::new(0),
            upstream_timeouts: Counter::new(0),
            upstream_failures: Counter::new(0),
            hold_timeouts: Counter::new(0),
            hold_failures: Counter::new(0),
            tcp_rejected: Counter::new(0),
            tcp_open: Counter::new(0),
            realtime_threads: Counter::new(0),
            realtime_demotions: Counter::new(0),
            upstream_latency: Histogram::new(),
            hold_time: Histogram::new(),
        }
    }
}

impl ProxyMetrics {
    pub(crate) fn count_query(&self, verdict: Verdict, rcode: Option<u16>) {
        self.queries[verdict.index()][rcode_slot(rcode)].fetch_add(1, Relaxed);
    }

    /// Queries answered (or not, rcode "NOREPLY") by verdict and rcode; zero rows left out.
    pub fn queries(&self) -> Vec<(Verdict, &'static str, u64)> {
        let mut out = Vec::new();
        for v in Verdict::ALL {
            for (slot, label) in RCODE_LABELS.iter().enumerate() {
                let n = self.queries[v.index()][slot].load(Relaxed);
                if n > 0 {
                    out.push((v, *label, n));
                }
            }
        }
        out
    }

    /// The count for one verdict and rcode label (e.g. `"REFUSED"`).
    pub fn query_count(&self, verdict: Verdict, rcode: &str) -> u64 {
        RCODE_LABELS
            .iter()
            .position(|l| *l == rcode)
            .map(|slot| self.queries[verdict.index()][slot].load(Relaxed))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantile() {
        let h = Histogram::new();
        for _ in 0..99 {
            h.observe(Duration::from_micros(40));
        }
        h.observe(Duration::from_millis(3));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.quantile_upper_bound(0.5), Some(50e-6));
        assert_eq!(s.quantile_upper_bound(0.99), Some(50e-6));
        assert_eq!(s.quantile_upper_bound(1.0), Some(5e-3));
        assert_eq!(s.buckets.last().unwrap(), &(None, 100));
    }

    #[test]
    fn counters_lose_nothing_with_more_threads_than_slots() {
        let c = Counter::new(5);
        let threads = 3 * COUNTER_SLOTS;
        std::thread::scope(|s| {
            for t in 0..threads {
                let c = &c;
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        c.fetch_add(2, Relaxed);
                        if (i + t as u64).is_multiple_of(2) {
                            c.fetch_sub(1, Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(c.load(Relaxed), 5 + threads as u64 * 30_000);
    }

    #[test]
    fn query_counts_by_label() {
        let m = ProxyMetrics::default();
        m.count_query(Verdict::Denied, Some(5));
        m.count_query(Verdict::Allowed, None);
        m.count_query(Verdict::Allowed, Some(0));
        assert_eq!(m.query_count(Verdict::Denied, "REFUSED"), 1);
        assert_eq!(m.query_count(Verdict::Allowed, "NOREPLY"), 1);
        assert_eq!(m.queries().len(), 3);
    }
}
