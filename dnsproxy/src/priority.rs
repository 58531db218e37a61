//! Realtime priority for the UDP receiving threads, within a CPU and rate budget
//! (`ProxyConfig::realtime_priority`).
//!
//! Why: a datagram for the proxy is a socket wake-up, and the kernel places the woken thread
//! on the CPU of the thread that sent the datagram, expecting that thread to sleep soon. A
//! client that keeps working holds that CPU, and the proxy's thread waits its turn (tens of
//! microseconds per wake-up on the machine of `bench/RESULTS.md`, twice per query) although
//! it needs only a few microseconds to forward. At realtime priority (SCHED_FIFO) the woken
//! thread runs at once; it preempts the sender only for those microseconds.
//!
//! The budget: realtime threads that keep running starve every ordinary task on their CPUs,
//! so a flood of queries must not turn the proxy into that. And at high rates realtime
//! priority costs more than it gains: a woken thread that runs at once reads one datagram
//! per wake-up and preempts its sender for each, where a thread that waits its turn reads
//! many per wake-up (at full load on the machine of `bench/RESULTS.md`, 58k queries/s at
//! 13 µs of CPU per query at realtime priority against 100k+ at 8 µs without). The receiving
//! threads report the CPU time they use and the datagrams they read to one budget per proxy;
//! over a window of [`WINDOW`], when together they used more than [`DEMOTE_ABOVE`] of the
//! machine's CPU time or read more than [`DEMOTE_RATE`] datagrams a second per core, every
//! one of them goes back to normal priority (counted), and they return to realtime after a
//! window below both [`PROMOTE_BELOW`] and [`PROMOTE_RATE`]. Under heavy load the proxy
//! therefore runs exactly as it would without the setting, sharing the CPUs fairly and
//! batching; the priority only shortens wake-ups at the rates where they are most of the
//! latency.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::metrics::ProxyMetrics;

/// The budget's window: the receiving threads' CPU time is summed over it.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// How often a busy thread reports its CPU time (an idle thread reports at its next receive).
const REPORT_EVERY: Duration = Duration::from_millis(20);
/// Share of the machine's CPU time (all cores) the receiving threads may use together and
/// stay at realtime priority: the rest of the machine always keeps at least half.
pub(crate) const DEMOTE_ABOVE: f64 = 0.5;
/// Share below which they return to realtime priority.
pub(crate) const PROMOTE_BELOW: f64 = 0.25;
/// Datagrams (queries and answers) a second per core above which batching beats preemption
/// (20k queries/s on 2 cores is 20k datagrams/s per core; the cost per query at realtime
/// priority grows well before 58k).
pub(crate) const DEMOTE_RATE: f64 = 32_000.0;
/// Rate below which the threads return to realtime priority.
pub(crate) const PROMOTE_RATE: f64 = 24_000.0;

/// The budget's state: pure (times are arguments).
#[derive(Debug)]
pub(crate) struct Budget {
    cores: f64,
    window_start: Instant,
    used: Duration,
    datagrams: u64,
    over: bool,
}

impl Budget {
    pub(crate) fn new(cores: usize, now: Instant) -> Budget {
        Budget {
            cores: cores.max(1) as f64,
            window_start: now,
            used: Duration::ZERO,
            datagrams: 0,
            over: false,
        }
    }

    /// A thread used `cpu` and read `datagrams` since its last report; at `now`. Returns
    /// whether the threads are over budget (to run at normal priority) as of the last closed
    /// window.
    pub(crate) fn report(&mut self, now: Instant, cpu: Duration, datagrams: u64) -> bool {
        self.used += cpu;
        self.datagrams += datagrams;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            let core_seconds = elapsed.as_secs_f64() * self.cores;
            let share = self.used.as_secs_f64() / core_seconds;
            let rate = self.datagrams as f64 / core_seconds;
            self.over = if self.over {
                share >= PROMOTE_BELOW || rate >= PROMOTE_RATE
            } else {
                share > DEMOTE_ABOVE || rate > DEMOTE_RATE
            };
            self.window_start = now;
            self.used = Duration::ZERO;
            self.datagrams = 0;
        }
        self.over
    }
}

/// The proxy's realtime setting, its budget and its receiving threads.
#[derive(Debug)]
pub(crate) struct Realtime {
    priority: i32,
    state: Mutex<State>,
    metrics: Arc<ProxyMetrics>,
}

#[derive(Debug)]
struct State {
    budget: Budget,
    /// The receiving threads (kernel thread ids), registered while they run.
    threads: Vec<libc::pid_t>,
    /// Whether they run at realtime priority now. They switch together, whichever thread
    /// closes the window: a thread blocked on a quiet socket follows too.
    at_realtime: bool,
}

impl Realtime {
    /// `priority`: 1–99 (checked with the rest of the configuration).
    pub(crate) fn new(priority: u8, metrics: Arc<ProxyMetrics>) -> Arc<Realtime> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Realtime {
            priority: i32::from(priority),
            state: Mutex::new(State {
                budget: Budget::new(cores, Instant::now()),
                threads: Vec::new(),
                at_realtime: true,
            }),
            metrics,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock panics; were it to, the threads' bookkeeping is still whole
        // (each change is one assignment), and serving on beats a dead receiving thread.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One receiving thread's part: created on the thread it governs, which reports to the
/// budget before it blocks.
pub(crate) struct Scheduling {
    realtime: Arc<Realtime>,
    tid: libc::pid_t,
    last_report: Instant,
    cpu_at_report: Duration,
    /// Datagrams read since the last report.
    datagrams: u64,
}

/// Set when realtime priority was refused once: the warning is given once per process.
static REFUSAL_REPORTED: AtomicBool = AtomicBool::new(false);

impl Scheduling {
    /// Registers the calling thread and gives it the proxy's priority now; `None` when the
    /// kernel refuses realtime priority (reported once per process: without the capability
    /// to set it, or in a cgroup that has no realtime runtime, the proxy serves at normal
    /// priority).
    pub(crate) fn start(realtime: &Arc<Realtime>) -> Option<Scheduling> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut state = realtime.state();
        if state.at_realtime {
            if let Err(e) = set_policy(tid, Some(realtime.priority)) {
                if !REFUSAL_REPORTED.swap(true, Relaxed) {
                    warn!(
                        error = %e,
                        "the DNS proxy's threads cannot have realtime priority (dns.realtimePriority); \
                         they run at normal priority, and each query may wait longer for a CPU \
                     (`realtimePriority: off` asks for normal priority without this warning)"
                    );
                }
                return None;
            }
            realtime.metrics.realtime_threads.fetch_add(1, Relaxed);
        }
        state.threads.push(tid);
        drop(state);
        Some(Scheduling {
            realtime: realtime.clone(),
            tid,
            last_report: Instant::now(),
            cpu_at_report: thread_cpu_time(),
            datagrams: 0,
        })
    }

    /// The thread read `n` datagrams.
    #[inline]
    pub(crate) fn received(&mut self, n: usize) {
        self.datagrams += n as u64;
    }

    /// Called before the thread blocks for its next batch: one clock read; every
    /// [`REPORT_EVERY`] the thread's CPU time and datagrams go to the budget, and when its
    /// verdict changes, every receiving thread's priority follows.
    #[inline]
    pub(crate) fn before_block(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_report) < REPORT_EVERY {
            return;
        }
        let cpu_now = thread_cpu_time();
        let used = cpu_now.saturating_sub(self.cpu_at_report);
        self.last_report = now;
        self.cpu_at_report = cpu_now;
        let realtime = &*self.realtime;
        let mut state = realtime.state();
        let over = state
            .budget
            .report(now, used, std::mem::take(&mut self.datagrams));
        if over != state.at_realtime {
            return;
        }
        state.at_realtime = !over;
        // The counts first: whoever sees a thread switched sees it counted.
        let metrics = &realtime.metrics;
        if over {
            metrics
                .realtime_threads
                .fetch_sub(state.threads.len() as u64, Relaxed);
            metrics.realtime_demotions.fetch_add(1, Relaxed);
        } else {
            metrics
                .realtime_threads
                .fetch_add(state.threads.len() as u64, Relaxed);
        }
        let priority = (!over).then_some(realtime.priority);
        for &tid in &state.threads {
            if let Err(e) = set_policy(tid, priority) {
                debug!(tid, error = %e, "cannot change a DNS thread's priority");
            }
        }
    }
}

impl Drop for Scheduling {
    fn drop(&mut self) {
        let mut state = self.realtime.state();
        state.threads.retain(|&t| t != self.tid);
        if state.at_realtime {
            self.realtime.metrics.realtime_threads.fetch_sub(1, Relaxed);
        }
    }
}

/// SCHED_FIFO at `priority`, or SCHED_OTHER, for thread `tid` of this process.
/// SCHED_RESET_ON_FORK: a process started from the thread does not inherit the priority.
fn set_policy(tid: libc::pid_t, priority: Option<i32>) -> io::Result<()> {
    let (policy, prio) = match priority {
        Some(p) => (libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, p),
        None => (libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, 0),
    };
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: `param` is a valid sched_param; `tid` is a thread of this process that is
    // registered (alive) while the state lock is held.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CPU time the calling thread has used (user and system).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_threads_go_to_normal_priority_over_budget_and_back_when_quiet() {
        let t0 = Instant::now();
        // Two cores: the budget is 100 ms of CPU per 100 ms window.
        let mut b = Budget::new(2, t0);
        // 20k queries/s: four threads at 15% of a CPU each, reporting every 20 ms; 40k
        // datagrams/s in all, queries and answers.
        let mut now = t0;
        for _ in 0..10 {
            now += ms(20);
            for _ in 0..4 {
                assert!(!b.report(now, Duration::from_micros(3000), 200));
            }
        }
        // A flood: the threads use 1.2 CPUs; over budget from the window it closes in on.
        let mut verdicts = Vec::new();
        for _ in 0..10 {
            now += ms(20);
            for _ in 0..4 {
                verdicts.push(b.report(now, ms(6), 0));
            }
        }
        assert!(verdicts.iter().any(|&v| v), "a flood goes over budget");
        assert!(
            verdicts.ends_with(&[true; 20]),
            "and stays over while it lasts"
        );
        // Between the thresholds (0.7 CPUs of 2): still over, no flapping.
        for _ in 0..10 {
            now += ms(20);
            for _ in 0..4 {
                assert!(b.report(now, Duration::from_micros(3500), 0));
            }
        }
        // Quiet again: a long idle gap then a little work closes a window far below.
        now += Duration::from_secs(5);
        assert!(!b.report(now, ms(2), 100));
        // An idle machine stays within budget.
        now += ms(200);
        assert!(!b.report(now, Duration::ZERO, 0));
    }

    #[test]
    fn exactly_half_the_machine_is_within_budget() {
        let t0 = Instant::now();
        let mut b = Budget::new(4, t0);
        assert!(!b.report(t0 + ms(100), ms(200), 0));
        assert!(b.report(t0 + ms(200), ms(201), 0));
        // Back under only below a quarter (100 ms of 400): 110 stays over.
        assert!(b.report(t0 + ms(300), ms(110), 0));
        assert!(!b.report(t0 + ms(400), ms(90), 0));
    }

    #[test]
    fn a_high_datagram_rate_goes_to_normal_priority_however_cheap() {
        let t0 = Instant::now();
        let mut b = Budget::new(2, t0);
        // 32k datagrams/s per core over 100 ms on 2 cores is 6,400: at the limit, within.
        assert!(!b.report(t0 + ms(100), ms(10), 6_400));
        // Above it, with little CPU: batching pays more than preemption.
        assert!(b.report(t0 + ms(200), ms(10), 6_500));
        // Back at realtime only below 24k per core (4,800 per window).
        assert!(b.report(t0 + ms(300), ms(10), 5_000));
        assert!(!b.report(t0 + ms(400), ms(10), 4_700));
    }

    #[test]
    fn the_thread_cpu_clock_counts_this_threads_work() {
        // Busy until the clock has counted 20 ms (however the thread is scheduled), bounded.
        let before = thread_cpu_time();
        let start = Instant::now();
        let mut x = 0u64;
        while thread_cpu_time() - before < ms(20) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the clock does not advance"
            );
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        // It counts this thread's work only: never more than the wall time.
        assert!(thread_cpu_time() - before <= start.elapsed());
        // A sleeping thread uses (almost) none.
        let before = thread_cpu_time();
        std::thread::sleep(ms(20));
        assert!(thread_cpu_time() - before < ms(5));
    }
}
