//! The upstream client: queries multiplexed by random 16-bit ID over a few unconnected UDP
//! sockets (random source ports chosen by the kernel at bind), and TCP queries over one
//! connection each.
//!
//! UDP is callback-driven, without a task per query: the query's continuation waits in the
//! pending table and the socket's receive thread runs it when the answer (or an ICMP error)
//! arrives; a sweeper runs the continuations of queries past their deadline. At tens of
//! thousands of queries per second this saves a task, a channel, a timer and two wake-ups
//! per query. Queries are queued per socket while the proxy works through a batch of client
//! datagrams and leave together, one sendmmsg per socket.
//!
//! Each socket has a thread of its own that blocks in recvmmsg, as dnsdist's responder
//! threads do: an answer costs one wake-up and one receive call, where a reactor spends an
//! epoll_wait per wake-up on top (about a fifth of the proxy's system calls per query).
//!
//! An answer is accepted only from the server that was asked, for an ID outstanding on that
//! socket, with the same question; anything else is counted and ignored (it may be spoofed or
//! late). ICMP errors (port unreachable, host unreachable) arrive through IP_RECVERR and fail
//! exactly the query whose datagram bounced.
//!
//! TCP goes one connection per query: TCP queries are rare next to UDP ones (truncated answers,
//! large records), and a fresh connection keeps the code free of connection-pool state and
//! head-of-line problems; loopback and LAN resolvers accept connections in microseconds.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::message::{answer_id, set_id};
use crate::metrics::ProxyMetrics;
use crate::priority::Realtime;
use crate::wire::Question;
use crate::{net, replies};

/// Why an upstream gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// No answer within the forward timeout: the client gets no reply and retries.
    Timeout,
    /// Anything else (unreachable, refused, malformed): the client gets SERVFAIL.
    Failed(String),
}

/// A query waiting for its answer: the question an answer must carry to be its answer, and
/// what to do with the outcome (the answer with the ID as sent, or why there is none). Kept
/// in the pending table itself (no allocation per query); what every query's continuation
/// needs besides is the pool's `Context`, held once.
pub(crate) trait Waiting: Send + 'static {
    type Context: Clone + Send + Sync + 'static;
    fn question(&self) -> &Question;
    /// `at`: when the outcome was known (an answer's receipt, the timeout's sweep). The
    /// answer is lent in the receive buffer: whatever must outlive the call is copied.
    fn done(self, ctx: &Self::Context, result: Result<&mut [u8], UpstreamError>, at: Instant);
}

/// Largest UDP answer read (the largest UDP payload): nothing an upstream sends is cut.
const MAX_UDP_ANSWER: usize = 65535;
/// How often queries past their deadline are looked for (the timeout's precision).
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

struct Pending<W> {
    server: SocketAddr,
    sent_at: Instant,
    deadline: Instant,
    waiting: W,
}

/// One socket of the pool with the queries outstanding on it, keyed by the ID sent.
struct Slot<W> {
    /// Blocking: its receive thread waits in recvmmsg.
    socket: std::net::UdpSocket,
    /// Whether `socket` is connected to its server (then queries go without an address).
    connected: bool,
    /// One lock for both tables: a query takes it once to be filed and queued.
    state: Mutex<SlotState<W>>,
}

struct SlotState<W> {
    pending: HashMap<u16, Pending<W>, BuildHasherDefault<IdHasher>>,
    /// Queries to send at the next [`UdpPool::flush`]: ID, server and where in `out_bytes`.
    outbox: Vec<(u16, SocketAddr, Range<usize>)>,
    /// The queued queries' bytes, one after the other (copied in, so a query costs no
    /// allocation of its own; the buffer is kept between batches).
    out_bytes: Vec<u8>,
}

impl<W> Default for SlotState<W> {
    fn default() -> Self {
        SlotState {
            pending: HashMap::default(),
            outbox: Vec::new(),
            out_bytes: Vec::new(),
        }
    }
}

/// The pending table's hasher. Its keys are IDs the proxy drew at random itself, so no one
/// can aim at a bucket and SipHash's protection buys nothing; a multiply spreads the 16 bits
/// over the whole word (the table reads its control bits from the top).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u16 keys are hashed (through write_u16); any other input still hashes soundly.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl<W> Slot<W> {
    fn take(&self, id: u16) -> Option<Pending<W>> {
        self.state.lock().expect("slot lock").pending.remove(&id)
    }
}

/// UDP sockets of one address family.
struct Family<W> {
    slots: Vec<Arc<Slot<W>>>,
}

/// The UDP side of the upstream client. Each shard of the proxy owns one, on its own
/// current-thread runtime, so a query, its upstream socket and its answer never cross threads.
///
/// The configured upstreams get sockets connected to them: the kernel then drops datagrams
/// from anyone else and skips a route lookup per send. Other servers (original destinations
/// in transparent mode) share the unconnected sockets.
pub(crate) struct UdpPool<W: Waiting> {
    /// Every socket, for [`UdpPool::flush`].
    all: Vec<Arc<Slot<W>>>,
    /// Per configured upstream (a handful: a scan beats hashing the address).
    connected: Vec<(SocketAddr, Family<W>)>,
    v4: Option<Family<W>>,
    v6: Option<Family<W>>,
    /// Handed to every continuation.
    ctx: W::Context,
    /// The sweeper, on the runtime that started the pool.
    sweeper: tokio::task::JoinHandle<()>,
    /// Tells the receive threads to end (see [`UdpPool::stop`]).
    stopping: Arc<AtomicBool>,
}

impl<W: Waiting> Drop for UdpPool<W> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How a pool's receive threads run.
pub(crate) struct PoolThreads<'a> {
    /// They run continuations inside it (so those may spawn tasks); the sweeper runs on it.
    pub runtime: &'a tokio::runtime::Handle,
    /// Their names: `name-<socket index>`.
    pub name: &'a str,
    /// Their priority (`ProxyConfig::realtime_priority`) and its budget.
    pub realtime: Option<Arc<Realtime>>,
}

impl<W: Waiting> UdpPool<W> {
    /// Opens `sockets_per_family` UDP sockets per address family (IPv6 best effort: a machine
    /// without IPv6 gets an IPv4-only client), starts a receive thread per socket and the
    /// sweeper (see [`PoolThreads`]). Every continuation is handed `ctx`.
    pub(crate) fn start(
        sockets_per_family: usize,
        upstreams: &[SocketAddr],
        mark: Option<u32>,
        metrics: Arc<ProxyMetrics>,
        threads: PoolThreads<'_>,
        ctx: W::Context,
    ) -> io::Result<UdpPool<W>> {
        let stopping = Arc::new(AtomicBool::new(false));
        let mut all = Vec::new();
        let mut family = |ipv6: bool, peer: Option<SocketAddr>| -> io::Result<Family<W>> {
            let mut slots = Vec::new();
            for _ in 0..sockets_per_family {
                let socket = net::udp_upstream(ipv6, mark)?;
                if let Some(peer) = peer {
                    socket.connect(peer)?;
                }
                let slot = Arc::new(Slot {
                    socket,
                    connected: peer.is_some(),
                    state: Mutex::default(),
                });
                all.push(slot.clone());
                slots.push(slot);
            }
            Ok(Family { slots })
        };
        let mut connected: Vec<(SocketAddr, Family<W>)> = Vec::new();
        for &u in upstreams {
            if !connected.iter().any(|(a, _)| *a == u) {
                connected.push((u, family(u.is_ipv6(), Some(u))?));
            }
        }
        let v4 = family(false, None)?;
        let v6 = match family(true, None) {
            Ok(f) => Some(f),
            Err(e) => {
                debug!(error = %e, "no IPv6 upstream sockets");
                None
            }
        };
        // The pool exists before its threads do: a thread that fails to start stops the
        // ones started (dropping the pool).
        let pool = UdpPool {
            sweeper: threads.runtime.spawn(sweep_loop(all.clone(), ctx.clone())),
            all,
            connected,
            v4: Some(v4),
            v6,
            ctx,
            stopping,
        };
        for (i, slot) in pool.all.iter().enumerate() {
            let (slot, metrics, ctx) = (slot.clone(), metrics.clone(), pool.ctx.clone());
            let (runtime, stopping) = (threads.runtime.clone(), pool.stopping.clone());
            let realtime = threads.realtime.clone();
            let (set_up, setting_up) = std::sync::mpsc::channel::<()>();
            std::thread::Builder::new()
                .name(format!("{}-{i}", threads.name))
                .spawn(move || {
                    let _on = runtime.enter();
                    // Its priority is in force before the pool is handed out.
                    let batch =
                        net::RecvBatch::new(MAX_UDP_ANSWER).with_priority(realtime.as_ref());
                    drop(set_up);
                    receive_thread(&slot, &ctx, &metrics, batch, &stopping)
                })?;
            // Returns once the thread dropped its end.
            let _ = setting_up.recv();
        }
        Ok(pool)
    }

    /// Ends the receive threads and the sweeper. Queries still outstanding get no answer:
    /// their continuations are dropped with the sockets.
    pub(crate) fn stop(&self) {
        self.sweeper.abort();
        if !self.stopping.swap(true, SeqCst) {
            for slot in &self.all {
                net::wake_receivers(&slot.socket);
            }
        }
    }

    /// Queues a copy of `query` (a client's message; its ID is replaced by a free random
    /// one) for `server`, to go at the next [`UdpPool::flush`], and arranges for `waiting` to
    /// be done exactly once: with the matching answer (ID as sent; the caller restores the
    /// client's), with `Timeout` once `timeout` passed, or with `Failed`.
    pub(crate) fn send(
        &self,
        server: SocketAddr,
        query: &[u8],
        now: Instant,
        timeout: Duration,
        waiting: W,
    ) {
        let connected = self
            .connected
            .iter()
            .find(|(a, _)| *a == server)
            .map(|(_, f)| f);
        let family = match connected {
            Some(f) => Some(f),
            None if server.is_ipv4() => self.v4.as_ref(),
            None => self.v6.as_ref(),
        };
        let Some(family) = family else {
            waiting.done(
                &self.ctx,
                Err(UpstreamError::Failed(format!("no socket for {server}"))),
                now,
            );
            return;
        };
        // One draw picks the socket (high half) and the first ID to try (low half).
        let draw: u32 = rand::random();
        let slot = &family.slots[(draw >> 16) as usize % family.slots.len()];
        let mut state = slot.state.lock().expect("slot lock");
        if state.pending.len() >= usize::from(u16::MAX) {
            drop(state);
            waiting.done(
                &self.ctx,
                Err(UpstreamError::Failed("every query ID is in use".into())),
                now,
            );
            return;
        }
        let mut id = draw as u16;
        let free = loop {
            match state.pending.entry(id) {
                Entry::Vacant(free) => break free,
                Entry::Occupied(_) => id = rand::random(),
            }
        };
        free.insert(Pending {
            server,
            sent_at: now,
            deadline: now + timeout,
            waiting,
        });
        let start = state.out_bytes.len();
        state.out_bytes.extend_from_slice(query);
        let end = state.out_bytes.len();
        set_id(&mut state.out_bytes[start..end], id);
        state.outbox.push((id, server, start..end));
    }

    /// Sends the queries [`UdpPool::send`] queued: one sendmmsg per socket. Call once the
    /// batch of client datagrams that produced them has been worked through.
    pub(crate) fn flush(&self) {
        for slot in &self.all {
            let (mut queued, mut bytes) = {
                let mut state = slot.state.lock().expect("slot lock");
                if state.outbox.is_empty() {
                    continue;
                }
                (
                    std::mem::take(&mut state.outbox),
                    std::mem::take(&mut state.out_bytes),
                )
            };
            flush_slot(slot, &self.ctx, &queued, &bytes);
            // The emptied vectors go back for the next batch (no allocation per flush).
            queued.clear();
            bytes.clear();
            let mut state = slot.state.lock().expect("slot lock");
            if state.outbox.is_empty() {
                std::mem::swap(&mut state.outbox, &mut queued);
                std::mem::swap(&mut state.out_bytes, &mut bytes);
            }
        }
    }
}

fn flush_slot<W: Waiting>(
    slot: &Slot<W>,
    ctx: &W::Context,
    queued: &[(u16, SocketAddr, Range<usize>)],
    bytes: &[u8],
) {
    let fd = slot.socket.as_raw_fd();
    let mut from = 0;
    while from < queued.len() {
        let rest = &queued[from..];
        let (sent, err) = net::send_batch(fd, rest.len(), |i| {
            let (_, server, range) = &rest[i];
            ((!slot.connected).then_some(*server), &bytes[range.clone()])
        });
        from += sent;
        match err {
            None => {}
            Some(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The send buffer is full: wait for room (at most net::SEND_WAIT).
                let (id, server, range) = &queued[from];
                let query = &bytes[range.clone()];
                let sent = if slot.connected {
                    slot.socket.send(query)
                } else {
                    slot.socket.send_to(query, server)
                };
                if let Err(e) = sent {
                    if let Some(p) = slot.take(*id) {
                        p.waiting.done(
                            ctx,
                            Err(UpstreamError::Failed(format!("send to {server}: {e}"))),
                            Instant::now(),
                        );
                    }
                }
                from += 1;
            }
            Some(e) => {
                let (id, server, _) = queued[from].clone();
                if let Some(p) = slot.take(id) {
                    p.waiting.done(
                        ctx,
                        Err(UpstreamError::Failed(format!("send to {server}: {e}"))),
                        Instant::now(),
                    );
                }
                from += 1;
            }
        }
    }
}

/// Sends `query` over a new TCP connection to `server` and reads one answer.
pub(crate) async fn tcp_exchange(
    server: SocketAddr,
    question: &Question,
    mut query: Vec<u8>,
    timeout: Duration,
    mark: Option<u32>,
    metrics: &ProxyMetrics,
) -> Result<Vec<u8>, UpstreamError> {
    let id: u16 = rand::random();
    set_id(&mut query, id);
    let started = Instant::now();
    let exchange = async {
        let socket =
            net::tcp_upstream(server, mark).map_err(|e| format!("socket for {server}: {e}"))?;
        let mut stream = socket
            .connect(server)
            .await
            .map_err(|e| format!("connect to {server}: {e}"))?;
        let len = u16::try_from(query.len()).map_err(|_| "query longer than 65535 bytes")?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&query);
        stream
            .write_all(&framed)
            .await
            .map_err(|e| format!("write to {server}: {e}"))?;
        loop {
            let n = stream
                .read_u16()
                .await
                .map_err(|e| format!("read from {server}: {e}"))?;
            let mut answer = vec![0u8; usize::from(n)];
            stream
                .read_exact(&mut answer)
                .await
                .map_err(|e| format!("read from {server}: {e}"))?;
            if answer_id(&answer) == Some(id) && question.asked_in(&answer) {
                return Ok::<_, String>(answer);
            }
            // A server may send unrelated messages on a connection (RFC 7766 allows it);
            // skip them, the timeout bounds the wait.
            metrics.upstream_mismatches.fetch_add(1, Relaxed);
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => {
            metrics.upstream_latency.observe(started.elapsed());
            Ok(answer)
        }
        Ok(Err(e)) => Err(UpstreamError::Failed(e)),
        Err(_) => Err(UpstreamError::Timeout),
    }
}

/// Reads answers and ICMP errors of one pooled socket and hands each to the query it belongs
/// to, until `stopping`.
fn receive_thread<W: Waiting>(
    slot: &Slot<W>,
    ctx: &W::Context,
    metrics: &ProxyMetrics,
    mut batch: net::RecvBatch,
    stopping: &AtomicBool,
) {
    let fd = slot.socket.as_raw_fd();
    let mut errors = vec![0u8; MAX_UDP_ANSWER];
    while let Some(result) = batch.recv_until(fd, stopping) {
        let got = match result {
            Ok(n) => n,
            Err(e) => {
                // The pending socket error of an ICMP report: its details are in the error
                // queue. Anything else is logged, and the next call waits again.
                replies::batch(|| drain_errors(slot, ctx, &mut errors));
                if e.raw_os_error().is_none_or(|c| !is_icmp_report(c)) {
                    debug!(error = %e, "upstream socket receive failed");
                    // Not a report: do not spin on a socket that keeps failing.
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        // One clock read per batch: the answers' time of receipt.
        let received = Instant::now();
        replies::batch(|| {
            for i in 0..got {
                let d = batch.get(i);
                match d.src {
                    Some(from) if !d.truncated => {
                        deliver(slot, ctx, metrics, batch.bytes_mut(i), from, received)
                    }
                    _ => {
                        metrics.upstream_mismatches.fetch_add(1, Relaxed);
                    }
                }
            }
        });
    }
}

/// The errors an ICMP report leaves pending on an IP_RECVERR socket.
fn is_icmp_report(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENETDOWN
            | libc::EMSGSIZE
            | libc::EPROTO
            | libc::ENOPROTOOPT
            | libc::EACCES
            | libc::EPERM
    )
}

/// `received`: when the batch holding `answer` was read.
fn deliver<W: Waiting>(
    slot: &Slot<W>,
    ctx: &W::Context,
    metrics: &ProxyMetrics,
    answer: &mut [u8],
    from: SocketAddr,
    received: Instant,
) {
    let Some(id) = answer_id(answer) else {
        metrics.upstream_mismatches.fetch_add(1, Relaxed);
        return;
    };
    let mut state = slot.state.lock().expect("slot lock");
    // One lookup finds, checks and takes the query.
    let p = match state.pending.entry(id) {
        Entry::Occupied(p)
            if p.get().server == from && p.get().waiting.question().asked_in(answer) =>
        {
            p.remove()
        }
        _ => {
            drop(state);
            metrics.upstream_mismatches.fetch_add(1, Relaxed);
            debug!(%from, id, "upstream answer matches no outstanding query");
            return;
        }
    };
    drop(state);
    metrics
        .upstream_latency
        .observe(received.saturating_duration_since(p.sent_at));
    p.waiting.done(ctx, Ok(answer), received);
}

fn drain_errors<W: Waiting>(slot: &Slot<W>, ctx: &W::Context, buf: &mut [u8]) {
    let fd = slot.socket.as_raw_fd();
    loop {
        match net::recv_error(fd, buf) {
            Ok((dst, n, errno)) => {
                if n < 2 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let mut state = slot.state.lock().expect("slot lock");
                if state.pending.get(&id).is_some_and(|p| p.server == dst) {
                    let p = state.pending.remove(&id).expect("checked above");
                    drop(state);
                    let err = io::Error::from_raw_os_error(errno);
                    p.waiting.done(
                        ctx,
                        Err(UpstreamError::Failed(format!("{dst}: {err}"))),
                        Instant::now(),
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!(error = %e, "reading the upstream error queue failed");
                return;
            }
        }
    }
}

/// Runs the continuations of queries whose deadline passed with `Timeout`.
async fn sweep_loop<W: Waiting>(slots: Vec<Arc<Slot<W>>>, ctx: W::Context) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        for slot in &slots {
            let expired: Vec<Pending<W>> = {
                let mut state = slot.state.lock().expect("slot lock");
                let pending = &mut state.pending;
                let ids: Vec<u16> = pending
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| pending.remove(id)).collect()
            };
            for p in expired {
                p.waiting.done(&ctx, Err(UpstreamError::Timeout), now);
            }
        }
    }
}
