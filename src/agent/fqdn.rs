//! DNS in the agent: the policy and learning hooks the DNS proxy calls, the expiry timer, the
//! persistence of learned state, and the `fqdn cache` and `monitor` API handlers.
//!
//! The road of one answer: proxy → [`AgentLearner::learn`] → FQDN cache (`learn`) → identity
//! and ipcache changes through the policy engine → datapath (policy maps first, ipcache
//! second) → the returned future resolves once the datapath confirmed every change issued so
//! far (so a sibling request's in-flight update is waited for too) → the proxy releases the
//! response.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dnsproxy::{
    Decision, DnsPolicy, HoldOutcome, LearnedAnswer, Learner, QueryContext, QueryEvent, Transport,
};
use fqdn_cache::{Answer, ConnectionSource, Snapshot, Timestamp};
use policy::fqdn::DnsName;
use policy::identity::IdentityAllocator;
use policy::mapstate::LookupVerdict;
use policy::model::{Direction, FqdnSelector, Protocol};

use super::datapath::Datapath;
use super::events::Event;
use super::server::query_pairs;
use super::state::AgentState;
use super::Agent;
use crate::view::{FqdnCleanView, FqdnEntryView};

pub fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// The datapath's open connections as a [`ConnectionSource`], read on the first question and
/// kept for the rest of the call.
struct LazyConnections<'a> {
    datapath: &'a dyn Datapath,
    open: OnceCell<HashSet<(u16, IpAddr)>>,
}

impl<'a> LazyConnections<'a> {
    fn new(datapath: &'a dyn Datapath) -> Self {
        LazyConnections {
            datapath,
            open: OnceCell::new(),
        }
    }
}

impl ConnectionSource for LazyConnections<'_> {
    fn is_alive(&self, endpoint: u16, ip: IpAddr) -> bool {
        self.open
            .get_or_init(|| self.datapath.connections().into_iter().collect())
            .contains(&(endpoint, ip))
    }
}

/// The proxy's view of the agent.
pub struct AgentDns(pub Arc<Agent>);

/// Flows remembered per thread before the table starts over (a flow is a client address,
/// a server and a transport: few per endpoint).
const MAX_REMEMBERED_FLOWS: usize = 4096;

/// The DNS decisions of one thread (each UDP shard of the proxy is one): per flow, the
/// endpoint and its compiled DNS rules, as of `epoch`. Shared with no other thread, so a
/// query whose flow is known is decided without the state lock and without touching memory
/// another core writes.
#[derive(Default)]
struct FlowDecisions {
    epoch: u64,
    // hashbrown's seeded default hasher: this lookup is on every query, where SipHash over
    // two socket addresses was a measurable share of the proxy's own work.
    flows: hashbrown::HashMap<(SocketAddr, SocketAddr, Transport), Option<FlowRules>>,
}

type FlowRules = (u16, Arc<super::state::DnsMatcher>);

thread_local! {
    static FLOW_DECISIONS: std::cell::RefCell<FlowDecisions> =
        std::cell::RefCell::new(FlowDecisions::default());
}

fn decide(flow: &Option<FlowRules>, qname: &DnsName) -> Decision {
    match flow {
        None => Decision::UnknownEndpoint,
        Some((endpoint_id, matcher)) => matcher.decide(*endpoint_id, qname),
    }
}

impl DnsPolicy for AgentDns {
    fn check(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        transport: Transport,
        qname: &DnsName,
    ) -> Decision {
        // The client's port does not choose its endpoint: the key keeps the address only.
        let key = (SocketAddr::new(client.ip(), 0), server, transport);
        FLOW_DECISIONS.with(|cell| {
            let mut known = cell.borrow_mut();
            if known.epoch == self.0.dns_epoch.load(Ordering::Acquire) {
                if let Some(flow) = known.flows.get(&key) {
                    return decide(flow, qname);
                }
            }
            // Unknown flow, or something changed since: ask the state, and remember the
            // answer under the epoch read with the lock held (a change made after it moves
            // the epoch again).
            let (epoch, flow) = {
                let st = self.0.lock();
                let epoch = self.0.dns_epoch.load(Ordering::Acquire);
                (epoch, st.dns_flow(client.ip(), server, transport))
            };
            if known.epoch != epoch || known.flows.len() >= MAX_REMEMBERED_FLOWS {
                known.flows.clear();
                known.epoch = epoch;
            }
            let decision = decide(&flow, qname);
            known.flows.insert(key, flow);
            decision
        })
    }
}

/// The agent's answer to a learn: ready at once (no allocation: the common case), or a wait
/// for the datapath.
enum Confirm {
    Now(std::future::Ready<HoldOutcome>),
    Wait(std::pin::Pin<Box<dyn Future<Output = HoldOutcome> + Send>>),
}

impl Future for Confirm {
    type Output = HoldOutcome;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<HoldOutcome> {
        match self.get_mut() {
            Confirm::Now(ready) => std::pin::Pin::new(ready).poll(cx),
            Confirm::Wait(wait) => wait.as_mut().poll(cx),
        }
    }
}

impl Learner for AgentDns {
    fn learn(
        &self,
        ctx: &QueryContext,
        answer: &LearnedAnswer,
    ) -> impl Future<Output = HoldOutcome> + Send + Unpin + 'static {
        let agent = &self.0;
        // An IP pushed out by maxIPsPerHostname stays while a connection to it is open. The
        // cache asks only when it pushes one out, which is rare: the datapath's connections
        // are read then (under the state lock), not for every answer.
        let open = LazyConnections::new(agent.datapath.as_ref());
        let (target, earlier) = {
            let mut st = agent.lock();
            let a = Answer {
                endpoint: ctx.endpoint_id,
                qname: &ctx.qname,
                chain: &answer.chain,
                ips: &answer.ips,
                ttl: answer.ttl,
            };
            let fc = st.fqdn.learn(&a, now(), &open);
            let changes = st.apply_fqdn_changes(fc);
            agent.submit(&st, &changes);
            let earlier = st.fqdn.next_expiry().is_some_and(|t| {
                t.as_unix_millis() < agent.expiry_deadline.load(Ordering::Relaxed)
            });
            // Every change issued so far, this answer's and any sibling's still in flight.
            (agent.issued(), earlier)
        };
        if earlier {
            agent.expiry_wakeup.notify_one();
        }
        // Usually every change up to `target` is applied already (an answer that refreshes
        // known IPs issues none, the in-memory datapath applies at once): no subscription then.
        // (No reference to the agent is taken then either: its count is shared by every
        // proxy thread.)
        if agent.applied_up_to(target) {
            return Confirm::Now(std::future::ready(HoldOutcome::Enforceable));
        }
        let agent = agent.clone();
        Confirm::Wait(Box::pin(async move {
            match agent.wait_applied(target).await {
                Ok(()) => HoldOutcome::Enforceable,
                Err(e) => HoldOutcome::Failed(e),
            }
        }))
    }

    fn observing(&self) -> bool {
        // With no policy in force the agent is a visibility tool: every query is logged.
        // Under policy, queries are logged at debug level (the monitor shows them all).
        // Otherwise (the hot path under load) there is nothing to do with an event.
        self.0.no_policy.load(Ordering::Relaxed)
            || self.0.events.has_subscribers()
            || tracing::enabled!(tracing::Level::DEBUG)
    }

    fn observe(&self, ev: &QueryEvent) {
        let visibility = self.0.no_policy.load(Ordering::Relaxed);
        if !self.observing() {
            return;
        }
        let st = self.0.lock();
        let endpoint_id = match ev.decision {
            Decision::Allow { endpoint_id } | Decision::Deny { endpoint_id } => Some(endpoint_id),
            Decision::UnknownEndpoint => None,
        };
        let endpoint = endpoint_id.and_then(|id| st.engine.endpoint(id));
        if visibility || tracing::enabled!(tracing::Level::DEBUG) {
            let name = endpoint.map(|e| e.name.as_str()).unwrap_or("-");
            let verdict = match ev.decision {
                Decision::Allow { .. } => "allowed",
                Decision::Deny { .. } => "denied",
                Decision::UnknownEndpoint => "denied (unknown endpoint)",
            };
            let rcode = ev
                .rcode
                .map(rcode_name)
                .unwrap_or_else(|| "no reply".into());
            let ips = ev
                .learned
                .as_ref()
                .map(|l| {
                    l.ips
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            if visibility {
                tracing::info!(endpoint = name, client = %ev.client, query = %ev.qname, qtype = %qtype_name(ev.qtype), verdict, rcode = %rcode, ips = %ips, "dns");
            } else {
                tracing::debug!(endpoint = name, client = %ev.client, query = %ev.qname, qtype = %qtype_name(ev.qtype), verdict, rcode = %rcode, ips = %ips, "dns");
            }
        }
        if !self.0.events.has_subscribers() {
            return;
        }
        let src_identity = endpoint_id.and_then(|id| st.engine.endpoint_identity(id));
        let dst_identity = st
            .engine
            .ipcache()
            .lookup(ev.server.ip())
            .map(|(_, id)| id)
            .unwrap_or(policy::identity::reserved::WORLD);
        let mut extra = serde_json::Map::new();
        extra.insert("query".into(), ev.qname.as_str().into());
        extra.insert("qtype".into(), qtype_name(ev.qtype).into());
        extra.insert(
            "rcode".into(),
            ev.rcode
                .map(|r| serde_json::Value::from(rcode_name(r)))
                .unwrap_or(serde_json::Value::Null),
        );
        let (ips, ttl) = match &ev.learned {
            Some(l) => (
                l.ips.iter().map(|i| i.to_string().into()).collect(),
                serde_json::Value::from(l.ttl),
            ),
            None => (Vec::new(), serde_json::Value::Null),
        };
        extra.insert("ips".into(), serde_json::Value::Array(ips));
        extra.insert("ttl".into(), ttl);
        extra.insert("transport".into(), ev.transport.as_str().into());
        extra.insert(
            "holdMicros".into(),
            (ev.hold.as_micros().min(u128::from(u64::MAX)) as u64).into(),
        );
        let protocol = match ev.transport {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        };
        let time = now().to_rfc3339();
        // The L4 verdict of the DNS flow itself, as the datapath's policy map decides it:
        // `redirected` when the entry sends it to the DNS proxy.
        if let (Some(id), Some(ep)) = (endpoint_id, endpoint) {
            if let Some(map) = st.engine.map_state(id) {
                let proto = match ev.transport {
                    Transport::Udp => Protocol::Udp,
                    Transport::Tcp => Protocol::Tcp,
                };
                let l = map.lookup(
                    dst_identity,
                    Direction::Egress,
                    proto.number(),
                    ev.server.port(),
                );
                let audit =
                    st.audit_global || st.audit_endpoints.get(&id).copied().unwrap_or(false);
                let verdict = match l.verdict {
                    LookupVerdict::Allow if l.proxy_port != 0 => "redirected",
                    LookupVerdict::Allow => "allowed",
                    _ if audit => "audit",
                    _ => "denied",
                };
                let mut extra = serde_json::Map::new();
                extra.insert("proxyPort".into(), l.proxy_port.into());
                extra.insert(
                    "rules".into(),
                    l.entry
                        .map(|e| {
                            e.rules
                                .iter()
                                .map(|r| serde_json::Value::from(r.policy.to_string()))
                                .collect()
                        })
                        .unwrap_or_default(),
                );
                self.0.events.publish(Event {
                    time: time.clone(),
                    kind: "policy-verdict",
                    endpoint: Some(ep.name.clone()),
                    direction: Some("egress"),
                    src_ip: Some(ev.client.ip().to_string()),
                    dst_ip: Some(ev.server.ip().to_string()),
                    dport: Some(ev.server.port()),
                    protocol: Some(protocol),
                    src_identity,
                    dst_identity: Some(dst_identity),
                    verdict,
                    extra,
                });
            }
        }
        self.0.events.publish(Event {
            time,
            kind: "dns",
            endpoint: endpoint.map(|e| e.name.clone()),
            direction: Some("egress"),
            src_ip: Some(ev.client.ip().to_string()),
            dst_ip: Some(ev.server.ip().to_string()),
            dport: Some(ev.server.port()),
            protocol: Some(protocol),
            src_identity,
            dst_identity: Some(dst_identity),
            verdict: match ev.decision {
                Decision::Allow { .. } => "allowed",
                _ => "denied",
            },
            extra,
        });
    }
}

pub fn qtype_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        64 => "SVCB".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        n => format!("TYPE{n}"),
    }
}

pub fn rcode_name(r: u16) -> String {
    match r {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// Ends learned lifetimes exactly when they are over: sleeps until the cache's next deadline
/// (or until a new answer may have brought an earlier one), then expires and applies.
pub async fn expiry_loop(agent: Arc<Agent>) {
    loop {
        let next = {
            // Read and published under the lock that answers learn under: an answer either
            // lands before (and is in `next`) or sees this deadline and wakes the loop.
            let st = agent.lock();
            let next = st.fqdn.next_expiry();
            let deadline = next.map_or(u64::MAX, |t| t.as_unix_millis());
            agent.expiry_deadline.store(deadline, Ordering::Relaxed);
            next
        };
        let wait = match next {
            Some(t) => {
                let left = t.as_unix_millis().saturating_sub(now().as_unix_millis());
                Duration::from_millis(left)
            }
            // Nothing learned: wait for the first answer.
            None => Duration::from_secs(3600),
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = agent.expiry_wakeup.notified() => continue,
            }
        }
        // Asked before taking the lock: a kernel datapath reads its conntrack map here.
        let open: HashSet<(u16, IpAddr)> = agent.datapath.connections().into_iter().collect();
        let target = {
            let mut st = agent.lock();
            let fc = st.fqdn.expire(now(), &open);
            if fc.is_empty() {
                None
            } else {
                let changes = st.apply_fqdn_changes(fc);
                agent.submit(&st, &changes);
                Some(agent.issued())
            }
        };
        let Some(target) = target else {
            // Nothing left the ipcache (the IPs are still held under other names). The cache
            // has moved its deadline on; a millisecond's pause keeps a deadline that did not
            // move from turning this loop into a spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        if let Err(e) = agent.wait_applied(target).await {
            tracing::error!("datapath refused an expiry: {e}");
        }
    }
}

const FQDN_STATE_FILE: &str = "fqdn-cache.json";
const FQDN_JOURNAL_FILE: &str = "fqdn-cache.journal";
/// Changes are appended to the journal this often (writes are batched).
const SAVE_INTERVAL_MS: u64 = 1000;
/// Changes encoded per hold of the state lock: the proxy's answers wait on that lock, so a
/// burst of changes is taken in steps of bounded length rather than all at once. At a
/// million names a record costs ~0.4 µs (its name, its group: cache misses), so ~0.1 ms per
/// hold (`fqdn-cache/examples/persist_cost.rs` measures it).
const ENCODE_STEP: usize = 256;
/// Entries a compaction copies per hold of the state lock (see `ENCODE_STEP`).
const SNAPSHOT_STEP: usize = 512;
/// The journal is folded into a new snapshot once it is larger than both the snapshot and
/// this. Larger than the snapshot: then restoring reads at most twice the snapshot's bytes,
/// the directory holds at most about three times them (old, new, journal), and compaction
/// writes no more bytes than the journal took, so disk writes stay within twice the change
/// volume. The floor keeps a small cache from being rewritten every few seconds.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(FQDN_STATE_FILE)
}

pub fn journal_file(dir: &Path) -> PathBuf {
    dir.join(FQDN_JOURNAL_FILE)
}

/// Writes `bytes` to `path` atomically: a reader (or a restart after a crash) sees the old
/// file or the new one, never half of one. The data is synced before the rename, so after a
/// power loss the name never points at a file whose data did not reach the disk, and the
/// directory after it, so the rename itself survives one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is synced.
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// Syncs a directory, making the renames in it durable (and ordered: one synced before the
/// next is made cannot be lost while the next survives).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves an unreadable state file out of the way so it can be inspected, and says so.
pub fn set_aside(path: &Path, why: &str) {
    let aside = path.with_extension(format!("corrupt-{}", now().as_unix_millis() / 1000));
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            "{}: {why}; set aside as {} and starting without it",
            path.display(),
            aside.display()
        ),
        Err(e) => tracing::error!("{}: {why}; cannot set it aside: {e}", path.display()),
    }
}

/// The journal's damaged part is set aside (the whole file, renamed) and the good prefix
/// becomes the journal again, so later batches are appended where a replay will find them.
fn set_journal_aside(path: &Path, bytes: &[u8], valid_len: usize, why: &fqdn_cache::Error) {
    let aside = path.with_extension(format!("journal.corrupt-{}", now().as_unix_millis() / 1000));
    // A copy first, then the good part replaces the journal atomically: a crash between the
    // two leaves the journal as it was (restored the same way next time), never none.
    if let Err(e) = std::fs::write(&aside, bytes) {
        tracing::error!(
            "{}: {why}; the batches before byte {valid_len} are restored; cannot keep a copy as {}: {e}",
            path.display(),
            aside.display()
        );
    } else {
        tracing::warn!(
            "{}: {why}; the batches before byte {valid_len} are restored, the file is set aside as {}",
            path.display(),
            aside.display()
        );
    }
    let mut good = bytes[..valid_len].to_vec();
    if good.len() < fqdn_cache::journal::JOURNAL_HEADER.len() {
        good = fqdn_cache::journal::JOURNAL_HEADER.to_vec();
    }
    if let Err(e) = write_atomic(path, &good) {
        tracing::error!("cannot write {}: {e}", path.display());
    }
}

/// Restores learned state from the state directory (before the proxy answers anything): the
/// snapshot, then the journal replayed over it, expired entries dropped. Then starts the
/// cache's change log, which the save loop appends to the journal.
pub fn restore(agent: &Arc<Agent>) {
    let dir = agent.lock().cfg.state_dir.clone();
    // First, while the snapshot in place is the one it names.
    let next = restore_next_journal(&dir);
    let snapshot = read_snapshot(&state_file(&dir)).unwrap_or_else(|| Snapshot::new(Vec::new()));
    let path = journal_file(&dir);
    let journal = match next {
        Some(bytes) => Ok(bytes),
        None => std::fs::read(&path),
    };
    let (records, batches) = match journal {
        Ok(bytes) => {
            let read = fqdn_cache::read_journal(&bytes);
            if let Some(problem) = &read.problem {
                set_journal_aside(&path, &bytes, read.valid_len, problem);
            }
            (read.records, read.batches)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => {
            tracing::error!("cannot read {}: {e}; restoring without it", path.display());
            (Vec::new(), 0)
        }
    };
    let t = now();
    let snapshot = fqdn_cache::apply_journal(snapshot, &records, t);
    let mut st = agent.lock();
    if !snapshot.endpoints.is_empty() {
        let names: Vec<(String, u16)> = st
            .engine
            .endpoints()
            .map(|e| (e.name.clone(), e.id))
            .collect();
        let fc = st.fqdn.restore(
            &snapshot,
            |n| names.iter().find(|(name, _)| name == n).map(|(_, id)| *id),
            t,
        );
        let changes = st.apply_fqdn_changes(fc);
        agent.submit(&st, &changes);
        let stats = st.fqdn.stats();
        tracing::info!(
            names = stats.names,
            ips = stats.ips,
            journal_batches = batches,
            file = %state_file(&dir).display(),
            "learned names restored"
        );
    }
    st.fqdn.enable_change_log();
}

/// The snapshot file, or `None` when there is none or it is set aside as unreadable.
fn read_snapshot(path: &Path) -> Option<Snapshot> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(
                "cannot read {}: {e}; starting without learned names",
                path.display()
            );
            return None;
        }
    };
    match Snapshot::decode(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            set_aside(path, &e.to_string());
            None
        }
    }
}

/// A write of learned state that failed: what was being written, and the OS error.
struct WriteFailure {
    /// What could not be done, naming the file ("append learned names to PATH").
    what: String,
    error: std::io::Error,
}

impl WriteFailure {
    fn new(what: String, error: std::io::Error) -> WriteFailure {
        WriteFailure { what, error }
    }
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot {}: {}", self.what, self.error)
    }
}

/// The wait before the first retry after a failed attempt to write learned state.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts while writes keep failing.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// When the save loop writes next while writes fail: a second after the first failed
/// attempt, then each wait twice the last (1 s, 2 s, 4 s … at most 60 s). A state directory
/// that cannot take writes (full, read-only, removed, failing) then costs one attempt — at
/// worst a snapshot of every learned name — and one log line per step, not per second.
/// Time is an argument.
#[derive(Debug, Default)]
struct WriteBackoff {
    /// Attempts that failed since the files last held everything learned.
    failed: u32,
    /// No attempt before this; `None`: every round of the loop is one.
    next_try: Option<Instant>,
}

impl WriteBackoff {
    /// The wait after the `failed`-th failed attempt in a row (counted from 1).
    fn delay(failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(16);
        BACKOFF_FIRST
            .saturating_mul(1 << doublings)
            .min(BACKOFF_MAX)
    }

    /// Whether a round at `now` writes (otherwise it only drops the logged changes, see
    /// `discard_changes`).
    fn due(&self, now: Instant) -> bool {
        self.next_try.is_none_or(|t| now >= t)
    }

    /// Attempts that failed since the files last held everything learned.
    fn failed_attempts(&self) -> u32 {
        self.failed
    }

    /// An attempt at `now` failed: returns the wait before the next.
    fn failed(&mut self, now: Instant) -> Duration {
        self.failed = self.failed.saturating_add(1);
        let wait = Self::delay(self.failed);
        self.next_try = Some(now + wait);
        wait
    }

    /// An attempt wrote all it tried, but the files do not hold everything yet (the
    /// snapshot that will is still to be written): the next rounds write again at the usual
    /// pace, and the failures still count, so a snapshot that fails too waits longer.
    fn progressed(&mut self) {
        self.next_try = None;
    }

    /// An attempt left the files holding everything learned: the attempts that failed
    /// before it, if any.
    fn recovered(&mut self) -> Option<u32> {
        self.next_try = None;
        Some(std::mem::take(&mut self.failed)).filter(|&n| n > 0)
    }
}

/// The journal being appended to, and the compaction under way, if any.
struct Persistence {
    dir: PathBuf,
    /// Open for appending; `None` after a write failed and could not be undone (the next
    /// compaction starts a new journal).
    journal: Option<std::fs::File>,
    /// Bytes of the journal that are good: where the next batch goes.
    journal_len: u64,
    snapshot_len: u64,
    compaction: Option<Compaction>,
    /// A batch was lost (a write failed, or changes were dropped while writes failed): the
    /// next compaction must run soon, since only a full snapshot brings the files back in
    /// line with the cache.
    resync: bool,
    /// The identity allocator's generation last written.
    identities_saved: Option<u64>,
    /// The last append failed: until an attempt appends again, the rounds between attempts
    /// drop the changes rather than fail once a second.
    append_failed: bool,
}

struct Compaction {
    /// Journal length when the snapshot steps began: everything after it goes on into the
    /// new journal.
    from: u64,
    tmp: PathBuf,
    task: tokio::task::JoinHandle<std::io::Result<(u64, usize)>>,
}

impl Persistence {
    /// Opens (or starts) the journal in `dir`; also says why it could not.
    fn open(dir: &Path) -> (Persistence, Option<WriteFailure>) {
        let path = journal_file(dir);
        let header = fqdn_cache::journal::JOURNAL_HEADER;
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut failure = None;
        if len < header.len() as u64 {
            // None yet (a first start, or state from before journals): a new one.
            if let Err(e) = write_atomic(&path, header) {
                failure = Some(WriteFailure::new(format!("create {}", path.display()), e));
            }
        }
        let journal = match std::fs::OpenOptions::new().append(true).open(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                // A journal that could not be created cannot be opened either: the first
                // failure is the one that says why.
                failure.get_or_insert_with(|| {
                    WriteFailure::new(format!("open {} for appending", path.display()), e)
                });
                None
            }
        };
        let journal_len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let p = Persistence {
            dir: dir.to_path_buf(),
            resync: journal.is_none(),
            journal,
            journal_len,
            snapshot_len: std::fs::metadata(state_file(dir))
                .map(|m| m.len())
                .unwrap_or(0),
            compaction: None,
            identities_saved: None,
            append_failed: false,
        };
        (p, failure)
    }

    /// Appends one framed batch and syncs it. On failure the journal is cut back to its
    /// last good batch (so nothing is ever appended after a torn one).
    fn append(&mut self, batch: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let Some(f) = &mut self.journal else {
            return Err(std::io::Error::other("the journal is not open"));
        };
        // A journal removed while open (its directory deleted, the file replaced) still
        // takes writes, but they reach no file a restart reads.
        if f.metadata()?.nlink() == 0 {
            self.journal = None;
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the file was removed or replaced while open",
            ));
        }
        // One write per batch, then fdatasync: a batch flushed here survives a power loss,
        // not only a killed process. One sync a second costs a few milliseconds of a
        // background thread's time; without it a crash of the machine could lose the page
        // cache's last seconds and leave the last batch torn (which replay drops).
        match f.write_all(batch).and_then(|()| f.sync_data()) {
            Ok(()) => {
                self.journal_len += batch.len() as u64;
                Ok(())
            }
            Err(e) => {
                if f.set_len(self.journal_len).is_err() {
                    self.journal = None;
                }
                Err(e)
            }
        }
    }
}

/// Appends what changed in the cache since the last call to the journal: the change log is
/// taken in constant time and encoded in steps of `ENCODE_STEP` under the state lock; the
/// framing, the write and the sync happen with the lock released. A batch that cannot be
/// appended is lost to the journal: the files wait for a new snapshot (`resync`).
fn flush_changes(agent: &Agent, p: &mut Persistence) -> Result<(), WriteFailure> {
    if p.journal.is_none() {
        // Nothing can be appended until a compaction starts a new journal, and its
        // snapshot copies the cache: the changes are in it.
        discard_changes(agent, p);
        return Ok(());
    }
    let (mut pending, endpoints) = {
        let mut st = agent.lock();
        let mut pending = st.fqdn.take_changes();
        if pending.is_empty() {
            st.fqdn.release_changes(&mut pending);
            return Ok(());
        }
        let endpoints = endpoint_names(&st);
        (pending, endpoints)
    };
    let mut batch =
        fqdn_cache::BatchEncoder::new(endpoints.iter().map(|(id, n)| (*id, n.as_str())));
    loop {
        // Room made before the lock is taken: growing the buffer under it would copy it all.
        batch.reserve(ENCODE_STEP);
        let done = agent
            .lock()
            .fqdn
            .encode_changes(&mut pending, ENCODE_STEP, &mut batch);
        if done {
            break;
        }
    }
    agent.lock().fqdn.release_changes(&mut pending);
    drop(pending);
    if batch.is_empty() {
        return Ok(());
    }
    let appended = p.append(&batch.finish());
    p.append_failed = appended.is_err();
    appended.map_err(|e| {
        p.resync = true;
        WriteFailure::new(
            format!("append learned names to {}", journal_file(&p.dir).display()),
            e,
        )
    })
}

/// Drops the changes logged since the last batch, leaving them to the next snapshot (it
/// copies the cache, so it holds them): what the save loop does with them while the journal
/// does not take them. The change log is coalesced per (endpoint, name) and per (endpoint,
/// name, IP), but its size is bounded by what changed since it was taken, not by the cache:
/// a name freed meanwhile keeps its id and its text parked in it (`FqdnCache::take_changes`).
/// Taken every second, it cannot grow through a long outage.
fn discard_changes(agent: &Agent, p: &mut Persistence) {
    let pending = {
        let mut st = agent.lock();
        let mut pending = st.fqdn.take_changes();
        st.fqdn.release_changes(&mut pending);
        pending
    };
    if !pending.is_empty() {
        p.resync = true;
    }
    // Freed here, with the lock released.
    drop(pending);
}

/// Starts a compaction when the journal has outgrown the snapshot (or a batch was lost):
/// the cache is copied in steps of `SNAPSHOT_STEP` entries, each under the state lock, and
/// written to a temporary file by a blocking thread while the journal keeps taking batches.
fn maybe_compact(agent: &Arc<Agent>, p: &mut Persistence) {
    let header = fqdn_cache::journal::JOURNAL_HEADER.len() as u64;
    let grown = p.journal_len.saturating_sub(header);
    if p.compaction.is_some() || !(p.resync || grown > p.snapshot_len.max(COMPACT_MIN_BYTES)) {
        return;
    }
    p.resync = false;
    let tmp = state_file(&p.dir).with_extension("json.tmp");
    let endpoints = endpoint_names(&agent.lock());
    let a = agent.clone();
    let path = tmp.clone();
    let task = tokio::task::spawn_blocking(move || write_snapshot_in_steps(&a, &path, &endpoints));
    p.compaction = Some(Compaction {
        from: p.journal_len,
        tmp,
        task,
    });
}

/// Writes the cache as a snapshot to `path` (synced), in steps; returns its size and the
/// entries written.
/// Every endpoint's id and name: what the persisted files name endpoints by.
fn endpoint_names(st: &AgentState) -> Vec<(u16, String)> {
    st.engine
        .endpoints()
        .map(|e| (e.id, e.name.clone()))
        .collect()
}

fn write_snapshot_in_steps(
    agent: &Agent,
    path: &Path,
    endpoints: &[(u16, String)],
) -> std::io::Result<(u64, usize)> {
    let file = std::fs::File::create(path)?;
    let mut w = fqdn_cache::SnapshotWriter::new(
        std::io::BufWriter::with_capacity(1 << 16, file),
        endpoints.iter().map(|(id, n)| (*id, n.as_str())),
    )?;
    let mut cursor = fqdn_cache::SnapshotCursor::default();
    let mut chunk = fqdn_cache::SnapshotChunk::default();
    loop {
        chunk.clear();
        let done = agent
            .lock()
            .fqdn
            .snapshot_chunk(&mut cursor, SNAPSHOT_STEP, now(), &mut chunk);
        w.write_chunk(&chunk)?;
        if done {
            break;
        }
    }
    let entries = w.entries();
    let file = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((file.metadata()?.len(), entries))
}

/// Once the snapshot steps are written: the new snapshot replaces the old (rename, then the
/// directory synced), then the journal is replaced by one holding only the batches appended
/// since the steps began. That journal is written beside them first (`write_next_journal`):
/// a crash between the two replacements, or a journal that cannot be replaced, leaves the
/// new snapshot with the old journal, which a restart must not replay (batches lost or
/// dropped while writes failed make its records undo what the snapshot holds). Any failure
/// leaves the files waiting for the next compaction (`resync`).
fn finish_compaction(p: &mut Persistence) -> Result<(), WriteFailure> {
    let Some(mut c) = p.compaction.take_if(|c| c.task.is_finished()) else {
        return Ok(());
    };
    // The task has finished, so its result is there without waiting (a round writes
    // without awaiting anything, see `writes_open`). Should the runtime's budget for this poll
    // be spent, the next round takes it.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let result = match std::pin::Pin::new(&mut c.task).poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => {
            p.compaction = Some(c);
            return Ok(());
        }
    };
    let written = match result {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(&c.tmp);
            p.resync = true;
            return Err(WriteFailure::new(
                format!("write a new snapshot to {}", c.tmp.display()),
                e,
            ));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&c.tmp);
            p.resync = true;
            return Err(WriteFailure::new(
                format!("write a new snapshot to {}", c.tmp.display()),
                std::io::Error::other(e.to_string()),
            ));
        }
    };
    let snapshot = state_file(&p.dir);
    let journal = journal_file(&p.dir);
    let tail = (|| -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut tail = fqdn_cache::journal::JOURNAL_HEADER.to_vec();
        if p.journal_len <= c.from {
            // Nothing appended since the steps began: the new journal is empty, whatever
            // became of the old file (one that could not be created or opened must not
            // keep the next journal from starting).
            return Ok(tail);
        }
        let mut f = std::fs::File::open(&journal)?;
        f.seek(std::io::SeekFrom::Start(c.from))?;
        f.take(p.journal_len - c.from).read_to_end(&mut tail)?;
        Ok(tail)
    })();
    let tail = match tail.and_then(|tail| {
        write_next_journal(&p.dir, &c.tmp, &tail)?;
        Ok(tail)
    }) {
        Ok(tail) => tail,
        Err(e) => {
            let _ = std::fs::remove_file(&c.tmp);
            p.resync = true;
            return Err(WriteFailure::new(
                format!("write {}", next_journal_file(&p.dir).display()),
                e,
            ));
        }
    };
    if let Err(e) = std::fs::rename(&c.tmp, &snapshot) {
        let _ = std::fs::remove_file(&c.tmp);
        p.resync = true;
        return Err(WriteFailure::new(
            format!("replace {}", snapshot.display()),
            e,
        ));
    }
    p.snapshot_len = written.0;
    // From here on the old journal is never replayed again (`restore_next_journal`): the
    // changes go nowhere until a new journal is open.
    let len = match sync_dir(&p.dir).and_then(|()| {
        write_atomic(&journal, &tail)?;
        Ok(tail.len() as u64)
    }) {
        Ok(len) => len,
        Err(e) => {
            p.journal = None;
            p.resync = true;
            return Err(WriteFailure::new(
                format!("start a new journal {}", journal.display()),
                e,
            ));
        }
    };
    p.journal_len = len;
    p.journal = match std::fs::OpenOptions::new().append(true).open(&journal) {
        Ok(f) => {
            p.append_failed = false;
            Some(f)
        }
        Err(e) => {
            // The handle held is the old journal's, which the rename replaced.
            p.journal = None;
            p.resync = true;
            return Err(WriteFailure::new(
                format!("open {} for appending", journal.display()),
                e,
            ));
        }
    };
    // Done with: the new journal is no longer the old one it names.
    let _ = std::fs::remove_file(next_journal_file(&p.dir));
    tracing::info!(
        entries = written.1,
        bytes = written.0,
        file = %snapshot.display(),
        "learned names compacted into a new snapshot"
    );
    Ok(())
}

/// Beside the snapshot and the journal while a new snapshot replaces the old (a
/// compaction's, a clean stop's): which file the new snapshot is, which the old journal is,
/// and the journal that goes with the new snapshot. The two replacements cannot be one: a
/// crash between them, or a journal that cannot be replaced, leaves the new snapshot with
/// the old journal, whose records (those from before batches that could not be written, or
/// were dropped while writes failed) would undo on replay what the new snapshot holds. A
/// restart finds this file and replays the journal it holds instead
/// (`restore_next_journal`).
///
/// Layout: `NEXT_JOURNAL_MAGIC`, the new snapshot's inode number (u64 LE), the old
/// journal's (0: there was none), then the new journal's bytes.
const NEXT_JOURNAL_FILE: &str = "fqdn-cache.journal.next";
const NEXT_JOURNAL_MAGIC: &[u8; 8] = b"FQDNNXT1";

fn next_journal_file(dir: &Path) -> PathBuf {
    dir.join(NEXT_JOURNAL_FILE)
}

/// The inode number of `path`, if it exists. A rename keeps it: the new snapshot's file
/// has it from its temporary name on. Two files that exist at the same time have different
/// ones, so the old journal's cannot be the new journal's.
fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Writes (synced) the file that says the snapshot written to `snapshot_tmp` goes with the
/// journal `journal` (framed as a journal file), not with the journal in place now.
fn write_next_journal(dir: &Path, snapshot_tmp: &Path, journal: &[u8]) -> std::io::Result<()> {
    let new_snapshot = inode(snapshot_tmp).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is gone", snapshot_tmp.display()),
        )
    })?;
    let old_journal = inode(&journal_file(dir)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(24 + journal.len());
    bytes.extend_from_slice(NEXT_JOURNAL_MAGIC);
    bytes.extend_from_slice(&new_snapshot.to_le_bytes());
    bytes.extend_from_slice(&old_journal.to_le_bytes());
    bytes.extend_from_slice(journal);
    write_atomic(&next_journal_file(dir), &bytes)
}

/// At restore, before the journal is read: a replacement of the snapshot interrupted after
/// the new snapshot took its place, while the old journal is still the journal, is finished
/// (the journal that goes with the new snapshot replaces it), and its bytes returned: they
/// are what restore replays. Otherwise the file is stale (the replacement did not happen, or
/// finished) and goes.
fn restore_next_journal(dir: &Path) -> Option<Vec<u8>> {
    let path = next_journal_file(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", path.display());
            return None;
        }
    };
    if bytes.len() < 24 || !bytes.starts_with(NEXT_JOURNAL_MAGIC) {
        set_aside(&path, "not a journal replacement record");
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (new_snapshot, old_journal) = (word(8), word(16));
    let journal = journal_file(dir);
    let interrupted = inode(&state_file(dir)) == Some(new_snapshot)
        && old_journal != 0
        && inode(&journal) == Some(old_journal);
    let next = bytes[24..].to_vec();
    if interrupted {
        if let Err(e) = write_atomic(&journal, &next) {
            // Kept, so the next start replays it too, never the old journal.
            tracing::error!(
                "cannot replace {} by the journal of the snapshot in place: {e}",
                journal.display()
            );
            return Some(next);
        }
        tracing::warn!(
            file = %journal.display(),
            "the journal of the snapshot in place restored from {} (the old journal was still in place)",
            path.display()
        );
    }
    if let Err(e) = std::fs::remove_file(&path).and_then(|()| sync_dir(dir)) {
        tracing::error!("cannot remove {}: {e}", path.display());
    }
    interrupted.then_some(next)
}

/// An attempt of the save loop: the batch of changes, the end of a finished compaction, the
/// start of a new one, the identities. Stops at the first write that fails. `Ok(true)` when
/// the files held everything learned after it (no batch lost since the last snapshot, no
/// compaction under way).
fn save_round(
    agent: &Arc<Agent>,
    p: &mut Persistence,
    failing: bool,
) -> Result<bool, WriteFailure> {
    flush_changes(agent, p)?;
    finish_compaction(p)?;
    let complete = !p.resync && p.compaction.is_none();
    maybe_compact(agent, p);
    // Learned names allocate identities: keep their numbers stable across restarts too.
    // While writes fail, an attempt is the snapshot that brings the files back in line, and
    // the identities wait for it (one failure per attempt, not one for each file).
    if complete || !failing {
        save_identities_if_changed(agent, &mut p.identities_saved)?;
    }
    Ok(complete)
}

/// Counts a failed attempt, sets the wait before the next, and says so: the first failure
/// names the file and the error; each later one (one per backoff step) how many attempts
/// failed and when the next is.
fn write_failed(agent: &Agent, backoff: &mut WriteBackoff, failure: &WriteFailure, now: Instant) {
    let wait = backoff.failed(now).as_secs();
    agent
        .metrics
        .state_write_failures
        .fetch_add(1, Ordering::Relaxed);
    agent
        .metrics
        .state_write_failing
        .store(1, Ordering::Relaxed);
    let failed = backoff.failed_attempts();
    if failed == 1 {
        tracing::error!(
            "{failure}; learned names stay in memory and are written once the state directory \
             takes writes again (next try in {wait}s)"
        );
    } else {
        tracing::error!(
            failed_attempts = failed,
            "{failure}; learned state still not written, {failed} attempts failed, next try in {wait}s"
        );
    }
}

/// Appends learned-state changes to the journal once a second, compacts it into a new
/// snapshot when it has grown, and rewrites the identities file when identities changed.
/// While writes fail the attempts back off (`WriteBackoff`); the rounds between them go on
/// appending to the journal while it takes writes (what fails is then a snapshot or the
/// identities file, which need new files), else drop the logged changes, and the first
/// attempt that can write starts a new snapshot, which holds everything learned meanwhile.
pub async fn save_loop(agent: Arc<Agent>) {
    let dir = agent.lock().cfg.state_dir.clone();
    let (mut p, mut backoff) = {
        let Some(_writes) = writes_open(&agent) else {
            return;
        };
        let (mut p, failure) = Persistence::open(&dir);
        let mut backoff = WriteBackoff::default();
        if let Some(f) = failure {
            write_failed(&agent, &mut backoff, &f, Instant::now());
        }
        // A journal restored with batches in it is folded into the snapshot at once: each
        // run starts from a snapshot holding everything restored, and the journal the next
        // start replays holds only what this run changed.
        let header = fqdn_cache::journal::JOURNAL_HEADER.len() as u64;
        if p.journal_len > header {
            p.resync = true;
        }
        (p, backoff)
    };
    loop {
        {
            // No await while it is held (see `writes_open`).
            let Some(_writes) = writes_open(&agent) else {
                return;
            };
            save_loop_round(&agent, &mut p, &mut backoff);
        }
        tokio::time::sleep(Duration::from_millis(SAVE_INTERVAL_MS)).await;
    }
}

/// One round of the save loop, once a second: an attempt when `backoff` says it is due (its
/// outcome counted there and said in the log), else the changes to the journal if it takes
/// them.
fn save_loop_round(agent: &Arc<Agent>, p: &mut Persistence, backoff: &mut WriteBackoff) {
    if backoff.due(Instant::now()) {
        match save_round(agent, p, backoff.failed_attempts() > 0) {
            Ok(true) => {
                if let Some(failed) = backoff.recovered() {
                    agent
                        .metrics
                        .state_write_failing
                        .store(0, Ordering::Relaxed);
                    tracing::warn!(
                        failed_attempts = failed,
                        dir = %p.dir.display(),
                        "learned state written again: persistence recovered after {failed} failed attempts"
                    );
                }
            }
            Ok(false) => backoff.progressed(),
            Err(f) => {
                write_failed(agent, backoff, &f, Instant::now());
                // Written again once the files are back in line: it may be gone with its
                // directory.
                p.identities_saved = None;
            }
        }
    } else if p.journal.is_some() && !p.append_failed {
        // The journal still takes batches: dropping them would lose to a crash during the
        // wait what it could have kept.
        if let Err(f) = flush_changes(agent, p) {
            write_failed(agent, backoff, &f, Instant::now());
        }
    } else {
        discard_changes(agent, p);
    }
}

/// The lock on the agent's writes to stateDir, unless a clean stop has taken them over
/// (`Agent::state_writes_stopped`). The stop aborts the save loop's task, but an abort does
/// not wait: a round already under way on another worker thread runs on to its next await,
/// and could append a batch after the stop's, rename an older snapshot over the stop's or
/// start the journal the stop removed again. So the loop writes only while holding this
/// lock, with no await, and only while not stopped; the stop marks it stopped and holds
/// the lock while it writes.
fn writes_open(agent: &Agent) -> Option<std::sync::MutexGuard<'_, bool>> {
    let stopped = agent
        .state_writes_stopped
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    (!*stopped).then_some(stopped)
}

const IDENTITIES_FILE: &str = "identities.json";

pub fn restore_identities(state_dir: &Path) -> IdentityAllocator {
    let path = state_dir.join(IDENTITIES_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match IdentityAllocator::from_persisted(&text) {
            Ok(a) => {
                tracing::info!(file = %path.display(), "identities restored");
                a
            }
            Err(e) => {
                set_aside(&path, &e.to_string());
                IdentityAllocator::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => IdentityAllocator::new(),
        Err(e) => {
            tracing::error!(
                "cannot read {}: {e}; identities start afresh",
                path.display()
            );
            IdentityAllocator::new()
        }
    }
}

/// Writes the identities file when the allocations changed since `saved` (serialized under
/// the state lock, so only then: it is proportional to the identities in use).
fn save_identities_if_changed(agent: &Agent, saved: &mut Option<u64>) -> Result<(), WriteFailure> {
    let (text, path, generation) = {
        let st = agent.lock();
        let generation = st.engine.identities().generation();
        if *saved == Some(generation) {
            return Ok(());
        }
        (
            st.engine.identities().to_persisted(),
            st.cfg.state_dir.join(IDENTITIES_FILE),
            generation,
        )
    };
    write_atomic(&path, text.as_bytes())
        .map_err(|e| WriteFailure::new(format!("save identities to {}", path.display()), e))?;
    *saved = Some(generation);
    Ok(())
}

pub fn save_identities(agent: &Agent) {
    if let Err(f) = save_identities_if_changed(agent, &mut None) {
        tracing::error!("{f}");
    }
}

/// Writes what changed since the last batch (clean stop; the save loop is stopped), whatever
/// the loop's backoff: there is no later attempt. While the loop's writes were failing, or
/// when the last batch cannot be journaled, a new snapshot is written instead (and should
/// that fail too, the journal takes the last batch if it still can).
pub fn save_now(agent: &Agent) {
    let dir = agent.lock().cfg.state_dir.clone();
    // From here on the save loop writes nothing, and a round of it still under way is over
    // once this lock is held.
    let mut stopped = agent
        .state_writes_stopped
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *stopped = true;
    // The loop dropped changes it could not write (`discard_changes`): only a snapshot of
    // the cache holds them now.
    let failing = agent.metrics.state_write_failing.load(Ordering::Relaxed) != 0;
    if !failing {
        let (mut p, failure) = Persistence::open(&dir);
        let journaled = match failure {
            Some(f) => Err(f),
            None => flush_changes(agent, &mut p),
        };
        match journaled {
            Ok(()) if !p.resync => return,
            Ok(()) => {}
            Err(f) => tracing::error!("{f}; a new snapshot will hold what was learned"),
        }
    }
    // Its own temporary file: a compaction the stopped loop began may still be writing the
    // usual one.
    let tmp = state_file(&dir).with_extension("json.stop.tmp");
    let endpoints = endpoint_names(&agent.lock());
    let snapshot = state_file(&dir);
    // With an empty journal: the old one goes below.
    let written = write_snapshot_in_steps(agent, &tmp, &endpoints)
        .and_then(|_| write_next_journal(&dir, &tmp, fqdn_cache::journal::JOURNAL_HEADER))
        .and_then(|()| std::fs::rename(&tmp, &snapshot))
        .and_then(|()| sync_dir(&dir));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::error!("cannot save learned names to {}: {e}", snapshot.display());
        if failing {
            // The journal may still take the changes since the loop's last round (only new
            // files refused, as the save loop's rounds go on appending then).
            let (mut p, failure) = Persistence::open(&dir);
            if let Err(f) = failure.map_or_else(|| flush_changes(agent, &mut p), Err) {
                tracing::error!("{f}");
            }
        }
        return;
    }
    tracing::info!(file = %snapshot.display(), "learned names saved as a new snapshot");
    // The snapshot alone is the state now. The journal goes: it lacks the batches that
    // could not be written, and replayed over the snapshot a record from before them (a
    // removal, say) would undo what they held. (Until it is gone, or if it cannot go, the
    // restart replays the empty journal of `write_next_journal` instead.)
    let journal = journal_file(&dir);
    let removed = match std::fs::remove_file(&journal) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => sync_dir(&dir),
    };
    match removed {
        Ok(()) => {
            let _ = std::fs::remove_file(next_journal_file(&dir));
        }
        Err(e) => tracing::error!(
            "cannot remove {}, which the new snapshot replaces: {e}",
            journal.display()
        ),
    }
}

/// `fqdn cache` filters: endpoint id and name, and the name as given.
type CacheFilter = (Option<u16>, Option<String>, Option<FqdnSelector>);

fn filter_of(agent: &Agent, q: &Option<String>) -> Result<CacheFilter, (StatusCode, String)> {
    let mut endpoint = None;
    let mut endpoint_name = None;
    let mut name = None;
    for (k, v) in query_pairs(q) {
        match k.as_str() {
            "endpoint" => {
                let st = agent.lock();
                let ep = st
                    .find_endpoint(&v)
                    .ok_or((StatusCode::NOT_FOUND, format!("no endpoint {v:?}")))?;
                endpoint = Some(ep.id);
                endpoint_name = Some(ep.name.clone());
            }
            "name" => {
                let sel = if v.contains('*') {
                    policy::fqdn::FqdnPattern::parse(&v).map(FqdnSelector::MatchPattern)
                } else {
                    DnsName::parse_match_name(&v).map(FqdnSelector::MatchName)
                }
                .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
                name = Some(sel);
            }
            other => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}"),
                ))
            }
        }
    }
    Ok((endpoint, endpoint_name, name))
}

fn error(code: StatusCode, msg: String) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

pub async fn cache_list(State(a): State<Arc<Agent>>, RawQuery(q): RawQuery) -> Response {
    let (ep, _, name) = match filter_of(&a, &q) {
        Ok(f) => f,
        Err((c, m)) => return error(c, m),
    };
    let st = a.lock();
    let t = now();
    let rows: Vec<FqdnEntryView> = st
        .fqdn
        .list(ep, name.as_ref())
        .into_iter()
        .map(|r| FqdnEntryView {
            endpoint: st
                .engine
                .endpoints()
                .find(|e| e.id == r.endpoint)
                .map(|e| e.name.clone())
                .unwrap_or_else(|| r.endpoint.to_string()),
            name: r.name.as_str().to_string(),
            ips: r.ips,
            ttl: r.expires.secs_left(t),
            expires_at: r.expires.to_rfc3339(),
            source: r.source.as_str().to_string(),
        })
        .collect();
    Json(rows).into_response()
}

pub async fn cache_clean(State(a): State<Arc<Agent>>, RawQuery(q): RawQuery) -> Response {
    let (ep, ep_name, name) = match filter_of(&a, &q) {
        Ok(f) => f,
        Err((c, m)) => return error(c, m),
    };
    let (target, removed) = {
        let mut st = a.lock();
        let before = st.fqdn.stats().entries + st.fqdn.stats().zombies;
        let fc = st.fqdn.clean(ep, name.as_ref());
        let after = st.fqdn.stats().entries + st.fqdn.stats().zombies;
        let changes = st.apply_fqdn_changes(fc);
        a.submit(&st, &changes);
        (a.issued(), before.saturating_sub(after))
    };
    if let Err(e) = a.wait_applied(target).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    tracing::info!(
        endpoint = ep_name.as_deref().unwrap_or("*"),
        name = name
            .as_ref()
            .map(|n| n.label_value())
            .as_deref()
            .unwrap_or("*"),
        removed,
        "learned names cleaned"
    );
    Json(FqdnCleanView { removed }).into_response()
}

/// Streams events as JSON lines until the client goes away.
pub async fn monitor(State(a): State<Arc<Agent>>, RawQuery(q): RawQuery) -> Response {
    let mut types: Vec<String> = Vec::new();
    for (k, v) in query_pairs(&q) {
        if k != "type" {
            return error(StatusCode::BAD_REQUEST, format!("unknown parameter {k:?}"));
        }
        if !matches!(v.as_str(), "policy-verdict" | "drop" | "dns" | "l7") {
            return error(StatusCode::BAD_REQUEST, format!("unknown event type {v:?}"));
        }
        types.push(v);
    }
    let mut rx = a.events.subscribe();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(256);
    tokio::spawn(async move {
        loop {
            let line = match rx.recv().await {
                Ok(ev) => {
                    if !types.is_empty() && !types.iter().any(|t| t == ev.kind) {
                        continue;
                    }
                    let mut l = serde_json::to_vec(&*ev).unwrap_or_default();
                    l.push(b'\n');
                    l
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let mut l = serde_json::to_vec(&serde_json::json!({
                        "time": now().to_rfc3339(), "type": "lost", "lost": n
                    }))
                    .unwrap_or_default();
                    l.push(b'\n');
                    l
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let stream = ReceiverStream(body_rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// An mpsc receiver as a stream of body chunks.
struct ReceiverStream(tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<Vec<u8>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// An agent with one endpoint whose state directory is `dir`, on the in-memory datapath.
    fn agent_in(dir: &Path) -> Arc<Agent> {
        let text = format!(
            "policyDir: policies\nstateDir: {}\ndatapath: none\nendpoints:\n  - name: frontend\n    labels: {{app: frontend}}\n    ips: [\"127.0.0.2\"]\n",
            dir.display()
        );
        let cfg = crate::config::Config::parse(&dir.join("config.yaml"), &text, Vec::new)
            .expect("config");
        let ports = super::super::state::AgentState::default_proxy_ports(&cfg);
        let (state, _) = super::super::state::AgentState::new(cfg, IdentityAllocator::new(), ports);
        Agent::new(
            state,
            Arc::new(super::super::datapath::MemoryDatapath::new()),
        )
    }

    /// At a clean stop the save loop's task is aborted, but a round already running on
    /// another worker thread runs on to its next await, and the task may be polled again
    /// before it is dropped: once `save_now` has taken over the files, the loop writes
    /// nothing more (no journal recreated after the stop removed it, no older snapshot
    /// renamed over the stop's) and ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_save_loop_writes_nothing_once_the_clean_stop_took_over() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent_in(dir.path());
        restore(&agent);
        // The loop's writes had been failing: the stop writes a snapshot and removes the
        // journal.
        agent
            .metrics
            .state_write_failing
            .store(1, Ordering::Relaxed);
        save_now(&agent);
        assert!(state_file(dir.path()).exists());
        assert!(!journal_file(dir.path()).exists());
        let ended = tokio::time::timeout(Duration::from_secs(3), save_loop(agent.clone())).await;
        assert!(ended.is_ok(), "the save loop goes on after the clean stop");
        assert!(
            !journal_file(dir.path()).exists(),
            "a journal written after the clean stop"
        );
    }

    /// The files a crash leaves at each point of a snapshot's replacement, and what a
    /// restart replays with the snapshot in place.
    #[test]
    fn a_restart_replays_the_journal_that_goes_with_the_snapshot_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old_journal = b"FQDNJRN1 old batches".to_vec();
        let tail = b"FQDNJRN1 batches since the steps began".to_vec();
        std::fs::write(state_file(d), b"old snapshot").unwrap();
        std::fs::write(journal_file(d), &old_journal).unwrap();
        let tmp = state_file(d).with_extension("json.tmp");
        let next = next_journal_file(d);

        // Before the new snapshot is in place: the old pair stands, the record goes.
        std::fs::write(&tmp, b"new snapshot").unwrap();
        write_next_journal(d, &tmp, &tail).unwrap();
        assert_eq!(restore_next_journal(d), None);
        assert_eq!(std::fs::read(journal_file(d)).unwrap(), old_journal);
        assert!(!next.exists());

        // The new snapshot in place, the old journal still there (a crash between the two,
        // or a journal that could not be replaced): the new snapshot's journal replaces it.
        write_next_journal(d, &tmp, &tail).unwrap();
        std::fs::rename(&tmp, state_file(d)).unwrap();
        assert_eq!(restore_next_journal(d), Some(tail.clone()));
        assert_eq!(std::fs::read(journal_file(d)).unwrap(), tail);
        assert!(!next.exists());

        // Both replaced, the record left behind: the journal in place is the new one, with
        // what was appended since.
        std::fs::write(&tmp, b"newer snapshot").unwrap();
        write_next_journal(d, &tmp, b"FQDNJRN1").unwrap();
        std::fs::rename(&tmp, state_file(d)).unwrap();
        write_atomic(&journal_file(d), b"FQDNJRN1 appended since").unwrap();
        assert_eq!(restore_next_journal(d), None);
        assert_eq!(
            std::fs::read(journal_file(d)).unwrap(),
            b"FQDNJRN1 appended since"
        );
        assert!(!next.exists());

        // A clean stop's snapshot in place, the old journal not removed yet: it is emptied.
        std::fs::write(&tmp, b"stop snapshot").unwrap();
        write_next_journal(d, &tmp, fqdn_cache::journal::JOURNAL_HEADER).unwrap();
        std::fs::rename(&tmp, state_file(d)).unwrap();
        assert_eq!(
            restore_next_journal(d),
            Some(fqdn_cache::journal::JOURNAL_HEADER.to_vec())
        );
        assert_eq!(
            std::fs::read(journal_file(d)).unwrap(),
            fqdn_cache::journal::JOURNAL_HEADER
        );
    }

    #[test]
    fn write_backoff_doubles_from_one_second_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| WriteBackoff::delay(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(WriteBackoff::delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn write_backoff_spaces_attempts_while_they_fail() {
        let t0 = Instant::now();
        let mut b = WriteBackoff::default();
        assert!(b.due(t0), "writes at the usual pace until something fails");
        // Rounds once a second for two minutes; which of them attempt while all fail.
        let mut attempts = Vec::new();
        for s in 0..120 {
            let now = t0 + secs(s);
            if b.due(now) {
                attempts.push(s);
                b.failed(now);
            }
        }
        assert_eq!(attempts, [0, 1, 3, 7, 15, 31, 63]);
        assert_eq!(b.failed_attempts(), 7);
        assert!(!b.due(t0 + secs(122)));
        assert!(b.due(t0 + secs(123)), "at most a minute apart");
    }

    #[test]
    fn write_backoff_progress_resumes_the_pace_and_keeps_the_count() {
        let t0 = Instant::now();
        let mut b = WriteBackoff::default();
        assert_eq!(b.failed(t0), secs(1));
        assert_eq!(b.failed(t0 + secs(1)), secs(2));
        assert!(!b.due(t0 + secs(2)));
        // The journal takes a batch again, the snapshot is under way: every round writes.
        b.progressed();
        assert!(b.due(t0 + secs(3)) && b.due(t0 + secs(4)));
        // The snapshot fails: the wait goes on growing from where it was.
        assert_eq!(b.failed(t0 + secs(4)), secs(4));
        assert!(!b.due(t0 + secs(7)));
        assert!(b.due(t0 + secs(8)));
        assert_eq!(b.recovered(), Some(3));
        assert!(b.due(t0 + secs(8)));
        assert_eq!(b.recovered(), None, "said once");
        assert_eq!(b.failed(t0 + secs(9)), secs(1), "a new outage starts over");
    }
}
