//! Watching the policy directory: a changed, added or removed file is re-validated and
//! applied as one step; a bad file leaves its previous content in force and is reported in
//! the log and in `status`.
//!
//! Polling (modification time and size of each file, twice a second) rather than inotify:
//! it sees every way a file can change — editors that write a new file and rename it over the
//! old one, Kubernetes ConfigMap mounts that swap a symlinked directory, network filesystems —
//! and costs a few `stat` calls per file per tick. Only files whose stamp changed are read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Agent;

pub const INTERVAL: Duration = Duration::from_millis(500);

pub async fn watch_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let before = agent.lock().revision;
        let problems = agent.sync_policies().await;
        let after = agent.lock().revision;
        if after != before {
            agent
                .metrics
                .policy_reloads_ok
                .fetch_add(1, Ordering::Relaxed);
        }
        if !problems.is_empty() {
            agent
                .metrics
                .policy_reloads_failed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
