//! `dns.cpuWakeLatency`: while the DNS proxy is busy, ask the kernel to keep the CPUs quick
//! to wake, and let them sleep deeply again when it is not.
//!
//! Why: every forwarded query wakes a sleeping thread twice (the query, then the answer). On
//! a machine whose idle CPUs enter a deep idle state — a virtual machine's halted vCPU, a bare
//! CPU's C6 — the scheduler cannot use a halted CPU at once: the woken thread either waits on
//! the CPU of the thread that woke it or for the halted one to come back. On the 2-vCPU
//! machine of bench/RESULTS.md that is most of the latency any forwarder adds (fqdnwall,
//! dnsdist and a bare receive/send relay alike). The kernel's PM QoS interface
//! (`/dev/cpu_dma_latency`) takes a process's upper bound on the CPUs' wake-up latency and
//! holds it for as long as the file stays open; closing it (or the process ending, however it
//! ends) withdraws it. With a bound of 0 the idle CPUs poll instead of halting, so a woken
//! thread runs at once on the idle CPU.
//!
//! Polling idle CPUs costs power (and, in a virtual machine, host CPU), so the bound is held
//! only while the proxy serves at least [`MIN_QPS`] queries a second, and withdrawn after a
//! second below that. It is off unless configured: the firewall does not change how the
//! machine idles unless its operator asks.

use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Agent;

/// The query rate (per second) from which the bound is held.
pub const MIN_QPS: u64 = 1_000;
/// How often the query counter is sampled.
const TICK: Duration = Duration::from_millis(100);
/// Samples kept: enough to tell the rate over the last second.
const WINDOW: usize = 11;
/// The rate that engages the bound is measured over this many ticks (quick to engage).
const ENGAGE_TICKS: usize = 2;

/// What the governor asks of the caller after a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Engage,
    Release,
}

/// Decides from samples of the proxy's running query count when to hold the bound: engaged
/// as soon as the last [`ENGAGE_TICKS`] ticks ran at [`MIN_QPS`] or more, released when the
/// whole last second ran below it. Pure: time comes in as milliseconds.
#[derive(Debug)]
pub struct Governor {
    min_qps: u64,
    /// (time in ms, running query count), oldest first.
    samples: std::collections::VecDeque<(u64, u64)>,
    engaged: bool,
    /// When the bound was last taken: the second that decides a release must start after it
    /// (the samples from before the load would otherwise release it at once).
    engaged_at_ms: u64,
}

impl Governor {
    pub fn new(min_qps: u64) -> Governor {
        Governor {
            min_qps,
            samples: std::collections::VecDeque::with_capacity(WINDOW + 1),
            engaged: false,
            engaged_at_ms: 0,
        }
    }

    pub fn engaged(&self) -> bool {
        self.engaged
    }

    /// Queries per second between the sample `back` places before the newest and the newest.
    fn rate_over(&self, back: usize) -> Option<u64> {
        let n = self.samples.len();
        if n <= back {
            return None;
        }
        let (t1, c1) = self.samples[n - 1];
        let (t0, c0) = self.samples[n - 1 - back];
        let ms = t1.saturating_sub(t0);
        if ms == 0 {
            return None;
        }
        Some(c1.saturating_sub(c0).saturating_mul(1000) / ms)
    }

    /// Records the count at `now_ms`; says when the bound must be taken or given back.
    pub fn sample(&mut self, now_ms: u64, count: u64) -> Option<Change> {
        if let Some(&(_, last)) = self.samples.back() {
            if count < last {
                // The counter went back (it never does; a restarted proxy would): start over.
                self.samples.clear();
            }
        }
        self.samples.push_back((now_ms, count));
        while self.samples.len() > WINDOW {
            self.samples.pop_front();
        }
        if !self.engaged {
            if self.rate_over(ENGAGE_TICKS)? >= self.min_qps {
                self.engaged = true;
                self.engaged_at_ms = now_ms;
                return Some(Change::Engage);
            }
        } else if self.samples.len() == WINDOW
            && self.samples[0].0 >= self.engaged_at_ms
            && self.rate_over(WINDOW - 1)? < self.min_qps
        {
            self.engaged = false;
            return Some(Change::Release);
        }
        None
    }
}

/// The kernel's PM QoS file: the bound is in force while the file is open.
const PM_QOS: &str = "/dev/cpu_dma_latency";

/// Opens the PM QoS file and writes the bound (microseconds, a native-endian 32-bit integer,
/// as the kernel's interface takes it).
fn hold(bound: Duration) -> std::io::Result<File> {
    let us = i32::try_from(bound.as_micros()).unwrap_or(i32::MAX);
    let mut f = std::fs::OpenOptions::new().write(true).open(PM_QOS)?;
    f.write_all(&us.to_ne_bytes())?;
    Ok(f)
}

/// Samples the proxy's query count every [`TICK`] and holds the bound while it is busy.
/// Failing to open the PM QoS file (no root, no such file) is logged once, at start or at the
/// first busy second, and ends the loop: the proxy serves as before.
pub async fn wake_loop(agent: Arc<Agent>, bound: Duration) {
    let Some(metrics) = agent.proxy_metrics.get().cloned() else {
        return;
    };
    // Said at start, not at the first busy second: opening the file alone asks for no bound
    // (the kernel's default) until a value is written.
    if let Err(e) = std::fs::OpenOptions::new().write(true).open(PM_QOS) {
        tracing::warn!(
            "dns.cpuWakeLatency: cannot hold a wake-up latency bound through {PM_QOS}: {e}; CPUs idle as the system decides"
        );
        return;
    }
    let mut governor = Governor::new(MIN_QPS);
    let mut held: Option<File> = None;
    let start = std::time::Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let count: u64 = metrics.queries().iter().map(|(_, _, n)| n).sum();
        let now_ms = start.elapsed().as_millis() as u64;
        match governor.sample(now_ms, count) {
            Some(Change::Engage) => match hold(bound) {
                Ok(f) => {
                    held = Some(f);
                    agent.metrics.cpu_wake_engaged.store(1, Ordering::Relaxed);
                    agent
                        .metrics
                        .cpu_wake_engagements
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        bound_us = bound.as_micros() as u64,
                        "DNS load at {MIN_QPS} queries/s or more: CPUs kept able to wake within the bound (dns.cpuWakeLatency)"
                    );
                }
                Err(e) => {
                    tracing::warn!(
                        "dns.cpuWakeLatency: cannot hold a wake-up latency bound through {PM_QOS}: {e}; CPUs idle as the system decides"
                    );
                    return;
                }
            },
            Some(Change::Release) => {
                held = None;
                agent.metrics.cpu_wake_engaged.store(0, Ordering::Relaxed);
                tracing::info!(
                    "DNS load below {MIN_QPS} queries/s for a second: wake-up latency bound withdrawn"
                );
            }
            None => {}
        }
        debug_assert_eq!(held.is_some(), governor.engaged());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `qps` for `ticks` ticks from (`t`, `count`); returns the changes seen.
    fn run(g: &mut Governor, t: &mut u64, count: &mut u64, qps: u64, ticks: usize) -> Vec<Change> {
        let mut out = Vec::new();
        for _ in 0..ticks {
            *t += 100;
            *count += qps / 10;
            out.extend(g.sample(*t, *count));
        }
        out
    }

    #[test]
    fn engages_within_two_ticks_of_load_and_releases_after_a_quiet_second() {
        let mut g = Governor::new(1000);
        let (mut t, mut c) = (0, 0);
        assert_eq!(g.sample(t, c), None);
        assert!(
            run(&mut g, &mut t, &mut c, 500, 20).is_empty(),
            "500 q/s: not busy"
        );
        assert_eq!(run(&mut g, &mut t, &mut c, 20_000, 2), vec![Change::Engage]);
        assert!(g.engaged());
        // A short dip inside the second does not release it.
        assert!(run(&mut g, &mut t, &mut c, 0, 3).is_empty());
        assert!(run(&mut g, &mut t, &mut c, 20_000, 20).is_empty());
        // Ten quiet ticks make the last second's rate fall below the threshold.
        let quiet = run(&mut g, &mut t, &mut c, 0, 10);
        assert_eq!(quiet, vec![Change::Release]);
        assert!(!g.engaged());
        assert!(run(&mut g, &mut t, &mut c, 0, 30).is_empty());
    }

    #[test]
    fn load_after_a_long_quiet_spell_keeps_the_bound() {
        let mut g = Governor::new(1000);
        let (mut t, mut c) = (0, 0);
        g.sample(t, c);
        assert!(run(&mut g, &mut t, &mut c, 0, 50).is_empty());
        // The second before the load was quiet; the load's first ticks engage the bound and
        // that quiet second must not release it again.
        assert_eq!(run(&mut g, &mut t, &mut c, 3000, 2), vec![Change::Engage]);
        assert!(run(&mut g, &mut t, &mut c, 3000, 40).is_empty());
        assert_eq!(run(&mut g, &mut t, &mut c, 0, 12), vec![Change::Release]);
    }

    #[test]
    fn the_threshold_is_inclusive_and_a_counter_reset_starts_over() {
        let mut g = Governor::new(1000);
        let (mut t, mut c) = (0, 0);
        g.sample(t, c);
        assert_eq!(run(&mut g, &mut t, &mut c, 1000, 2), vec![Change::Engage]);
        assert!(
            run(&mut g, &mut t, &mut c, 1000, 30).is_empty(),
            "steady at the threshold"
        );
        // A counter that goes back is a new series: no rate until two samples are in.
        assert_eq!(g.sample(t + 100, 0), None);
        assert!(g.engaged());
    }
}
