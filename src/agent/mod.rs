//! The running agent: the shared state behind the local API, the policy directory watcher,
//! the datapath and the metrics.
//!
//! One lock ([`Agent::state`]) guards the policy engine. Every change is computed and handed
//! to the datapath while that lock is held, so the datapath sees changes in the order the
//! engine made them; waiting for the datapath to confirm happens after the lock is released.

pub mod bpf;
pub mod datapath;
pub mod events;
pub mod fqdn;
pub mod l7;
pub mod metrics;
pub mod metrics_http;
pub mod reload;
pub mod server;
pub mod state;
pub mod wake;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use policy::engine::Changes;
use tokio::sync::{watch, Notify};

use datapath::Datapath;
use events::Events;
use metrics::Metrics;
use state::AgentState;

pub struct Agent {
    state: Mutex<AgentState>,
    pub datapath: Arc<dyn Datapath>,
    pub events: Events,
    pub metrics: Metrics,
    pub started: Instant,
    /// Sequence number of the last change handed to the datapath.
    issued: AtomicU64,
    /// Highest sequence number the datapath confirmed (it confirms in order).
    applied: watch::Sender<u64>,
    /// `applied`'s value, readable without the channel's lock (the DNS proxy asks for every
    /// answer from several threads).
    applied_seq: AtomicU64,
    /// Woken when new learned lifetimes may end earlier than the expiry timer thinks.
    pub expiry_wakeup: Notify,
    /// The deadline (Unix milliseconds, `u64::MAX` for none) the expiry loop is sleeping
    /// towards. Written by the loop and compared by each answer under the state lock, so an
    /// answer wakes the loop only when it brings an earlier deadline (not once per answer).
    pub expiry_deadline: AtomicU64,
    /// Addresses the DNS proxy and the metrics endpoint really serve (ports resolved).
    pub dns_bound: OnceLock<Vec<SocketAddr>>,
    pub metrics_bound: OnceLock<SocketAddr>,
    pub proxy_metrics: OnceLock<Arc<dnsproxy::ProxyMetrics>>,
    /// Counters of the L7 proxies, once they run.
    pub l7_stats: OnceLock<Arc<::l7::L7Stats>>,
    /// No policy is in force (every query is logged). Kept here so the proxy's per-query
    /// hook can tell without taking the state lock.
    pub no_policy: AtomicBool,
    /// The policy revision in force, readable without the state lock (the L7 proxies'
    /// compiled rules follow it).
    pub policy_revision: AtomicU64,
    /// Moves (under the state lock) whenever a change is submitted: the DNS decisions the
    /// proxy's threads keep per flow (`fqdn::AgentDns::check`) are valid while it stands
    /// still. Drawn from a process-wide counter, so two agents never share a value.
    pub dns_epoch: AtomicU64,
    /// Whether a clean stop has taken over the files in stateDir; its lock keeps the save
    /// loop's writes and the stop's apart (`fqdn::save_now`).
    pub state_writes_stopped: Mutex<bool>,
}

/// Source of [`Agent::dns_epoch`] values.
static DNS_EPOCHS: AtomicU64 = AtomicU64::new(1);

fn next_dns_epoch() -> u64 {
    DNS_EPOCHS.fetch_add(1, Ordering::Relaxed)
}

impl Agent {
    pub fn new(state: AgentState, datapath: Arc<dyn Datapath>) -> Arc<Agent> {
        Arc::new(Agent {
            state: Mutex::new(state),
            datapath,
            events: Events::new(),
            metrics: Metrics::default(),
            started: Instant::now(),
            issued: AtomicU64::new(0),
            applied: watch::channel(0).0,
            applied_seq: AtomicU64::new(0),
            expiry_wakeup: Notify::new(),
            expiry_deadline: AtomicU64::new(u64::MAX),
            dns_bound: OnceLock::new(),
            metrics_bound: OnceLock::new(),
            proxy_metrics: OnceLock::new(),
            l7_stats: OnceLock::new(),
            no_policy: AtomicBool::new(true),
            policy_revision: AtomicU64::new(0),
            dns_epoch: AtomicU64::new(next_dns_epoch()),
            state_writes_stopped: Mutex::new(false),
        })
    }

    /// The state, for reading or for changes that go through [`Agent::apply`].
    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        // A panic while holding the lock leaves the engine as it was before the panicking
        // call finished; serving on is better than taking the firewall down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands engine changes to the datapath, in order, and returns the sequence number of the
    /// last one. Call with the state lock held (pass the guard): that is what makes the
    /// datapath see changes in the order the engine made them.
    pub fn submit(self: &Arc<Self>, held: &MutexGuard<'_, AgentState>, changes: &[Changes]) -> u64 {
        if changes.iter().any(|c| !c.maps.is_empty()) {
            held.forget_dns_matchers();
        }
        if changes.iter().any(|c| !c.is_empty()) {
            self.dns_epoch.store(next_dns_epoch(), Ordering::Release);
        }
        let mut seq = self.issued.load(Ordering::SeqCst);
        for c in changes.iter().filter(|c| !c.is_empty()) {
            seq = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let mut fut = self.datapath.apply(c);
            // The in-memory datapath is done at once; don't pay for a task then.
            match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(r) => self.confirmed(seq, r),
                Poll::Pending => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let r = fut.await;
                        me.confirmed(seq, r);
                    });
                }
            }
        }
        seq
    }

    fn confirmed(&self, seq: u64, r: Result<(), String>) {
        if let Err(e) = r {
            self.metrics.datapath_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("datapath: {e}");
        }
        self.applied.send_if_modified(|v| {
            if seq > *v {
                *v = seq;
                self.applied_seq.fetch_max(seq, Ordering::SeqCst);
                true
            } else {
                false
            }
        });
    }

    /// Sequence number of the last change issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    /// Whether the datapath confirmed every change up to `seq` already.
    pub fn applied_up_to(&self, seq: u64) -> bool {
        self.applied_seq.load(Ordering::SeqCst) >= seq
    }

    /// Resolves once the datapath confirmed every change up to `seq`.
    pub async fn wait_applied(&self, seq: u64) -> Result<(), String> {
        let mut rx = self.applied.subscribe();
        rx.wait_for(|v| *v >= seq)
            .await
            .map(|_| ())
            .map_err(|_| "the datapath stopped".to_string())
    }

    /// Learned names and IPs, for `status`.
    pub fn fqdn_counts(&self, st: &AgentState) -> (usize, usize) {
        let s = st.fqdn.stats();
        (s.names, s.ips)
    }

    pub fn dns_listen(&self) -> Vec<SocketAddr> {
        self.dns_bound.get().cloned().unwrap_or_default()
    }

    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        self.metrics_bound.get().copied()
    }

    /// Re-reads the policy directory and applies what changed; waits for the datapath.
    pub async fn sync_policies(self: &Arc<Self>) -> Vec<String> {
        let (target, problems) = {
            let mut st = self.lock();
            let (changes, problems) = st.sync_policy_dir();
            self.no_policy
                .store(st.engine.policies().next().is_none(), Ordering::Relaxed);
            self.policy_revision.store(st.revision, Ordering::SeqCst);
            (self.submit(&st, &changes), problems)
        };
        if let Err(e) = self.wait_applied(target).await {
            tracing::error!("policy change not confirmed: {e}");
        }
        problems
    }
}
