//! The listeners and the per-query pipeline: judge → decide → forward → learn → hold → answer.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Mutex, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{ProxyConfig, RejectCode};
use crate::hooks::{
    Decision, DnsPolicy, HoldOutcome, LearnedAnswer, Learner, OriginalDst, QueryContext,
    QueryEvent, Transport,
};
use crate::message::{
    extract_learning, header_rcode, parse_client_query, set_id, ClientQuery, QueryMeta, Rejection,
};
use crate::metrics::{ProxyMetrics, Verdict};
use crate::priority::Realtime;
use crate::upstream::{tcp_exchange, PoolThreads, UdpPool, UpstreamError, Waiting};
use crate::wire::{fast_answer, Question};
use crate::{net, replies, DnsProxyError};

/// Largest UDP query read; larger datagrams are truncated by the kernel and dropped.
const MAX_UDP_QUERY: usize = 4096;
/// Attempts at finding one free port for UDP and TCP when a listen address has port 0.
const PORT_ATTEMPTS: usize = 16;

/// A running proxy. Dropping it (or [`DnsProxy::shutdown`]) stops the listeners; queries in
/// flight finish on their own (bounded by the forward timeout and the response hold).
pub struct DnsProxy {
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    metrics: Arc<ProxyMetrics>,
    /// TCP listeners, on the runtime that started the proxy.
    tasks: Vec<JoinHandle<()>>,
    shards: Vec<ShardHandle>,
}

impl Drop for DnsProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shards.clear();
    }
}

/// What stops a UDP shard: its listener threads read `stopping` after every receive and are
/// woken out of it; dropping `_runtime` ends the shard's runtime thread, which stops the
/// shard's upstream pool.
struct ShardHandle {
    stopping: Arc<AtomicBool>,
    listeners: Vec<Arc<std::net::UdpSocket>>,
    _runtime: oneshot::Sender<()>,
}

impl Drop for ShardHandle {
    fn drop(&mut self) {
        self.stopping.store(true, SeqCst);
        for l in &self.listeners {
            net::wake_receivers(l);
        }
    }
}

struct Shared<P, L> {
    config: ProxyConfig,
    policy: Arc<P>,
    learner: Arc<L>,
    original_dst: Option<Arc<dyn OriginalDst>>,
    metrics: Arc<ProxyMetrics>,
    /// The bound listen addresses: a query received on one of these was sent to the proxy
    /// itself, not intercepted.
    own: Vec<SocketAddr>,
    next_upstream: AtomicUsize,
    /// `realtime_priority` and the CPU and rate budget of the UDP receiving threads.
    realtime: Option<Arc<Realtime>>,
}

impl DnsProxy {
    /// Binds every listen address (UDP: `udp_sockets_per_listen` SO_REUSEPORT sockets; TCP: one
    /// listener), opens the upstream client and starts serving on the current tokio runtime.
    /// A listen address with port 0 gets one free port shared by its UDP and TCP sockets.
    ///
    /// UDP is served by `udp_sockets_per_listen` shards, each with one socket of every listen
    /// address's SO_REUSEPORT group and upstream sockets of its own (shared nothing but the
    /// policy, the learner and the counters). Every UDP socket has a thread blocking in
    /// recvmmsg on it: a listener's thread judges and forwards the queries it reads, an
    /// upstream socket's thread matches the answers, learns and replies. Each shard also runs a
    /// current-thread runtime, which those threads enter: the learner is called on them, and a
    /// future it returns that is not ready at once is polled as a task of that runtime. TCP is
    /// served on the runtime that calls `start`. The learner's futures must therefore rely on
    /// runtime-agnostic primitives (tokio channels, `watch`, `Notify`), not on tasks of the
    /// caller's runtime being polled by the shard.
    pub async fn start<P: DnsPolicy, L: Learner>(
        config: ProxyConfig,
        policy: Arc<P>,
        learner: Arc<L>,
        original_dst: Option<Arc<dyn OriginalDst>>,
    ) -> Result<DnsProxy, DnsProxyError> {
        config.check()?;
        let metrics = Arc::new(ProxyMetrics::default());
        let shard_count = config.udp_sockets_per_listen;
        let mut shard_sockets: Vec<Vec<std::net::UdpSocket>> =
            (0..shard_count).map(|_| Vec::new()).collect();
        let mut tcp_listeners = Vec::new();
        let mut own = Vec::new();
        for &addr in &config.listen {
            let (udp, tcp, bound) = bind_listen(addr, &config)?;
            for (i, socket) in udp.into_iter().enumerate() {
                shard_sockets[i].push(socket);
            }
            tcp_listeners.push(tcp);
            own.push(bound);
        }
        if let Some(u) = config.upstreams.iter().find(|u| own.contains(u)) {
            return Err(DnsProxyError::Config(format!(
                "upstream {u} is one of the proxy's own listen addresses"
            )));
        }
        let pool_sockets = config.upstream_udp_sockets.div_ceil(shard_count).max(1);
        let tcp_limit = Arc::new(Semaphore::new(config.tcp_max_connections));
        let realtime = config
            .realtime_priority
            .map(|p| Realtime::new(p, metrics.clone()));
        let shared = Arc::new(Shared {
            config,
            policy,
            learner,
            original_dst,
            metrics: metrics.clone(),
            own: own.clone(),
            next_upstream: AtomicUsize::new(0),
            realtime,
        });
        let mut shards = Vec::new();
        for (i, sockets) in shard_sockets.into_iter().enumerate() {
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let (ready_tx, ready_rx) = oneshot::channel::<Result<(), DnsProxyError>>();
            // A copy of its own: the shard takes a reference per query in flight, and a
            // reference count shared by the shards would travel between cores each time.
            let shared = Arc::new(shared.copy());
            let listeners: Vec<Arc<std::net::UdpSocket>> =
                sockets.into_iter().map(Arc::new).collect();
            let handle = ShardHandle {
                stopping: Arc::new(AtomicBool::new(false)),
                listeners: listeners.clone(),
                _runtime: stop_tx,
            };
            let stopping = handle.stopping.clone();
            // From here on the handle stops whatever part of the shard started.
            shards.push(handle);
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    run_shard(
                        i,
                        shared,
                        listeners,
                        pool_sockets,
                        stopping,
                        ready_tx,
                        stop_rx,
                    )
                })
                .map_err(DnsProxyError::Shard)?;
            match ready_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(DnsProxyError::Shard(io::Error::other(
                        "the shard's thread died while starting",
                    )))
                }
            }
        }
        let mut tasks = Vec::new();
        for listener in tcp_listeners {
            let listener = TcpListener::from_std(listener).map_err(|e| DnsProxyError::Listen {
                transport: "tcp",
                addr: own[tasks.len()],
                source: e,
            })?;
            tasks.push(tokio::spawn(serve_tcp(
                shared.clone(),
                listener,
                tcp_limit.clone(),
            )));
        }
        info!(listen = ?own, upstreams = ?shared.config.upstreams, transparent = shared.config.transparent, shards = shard_count, "DNS proxy serving");
        Ok(DnsProxy {
            udp_addrs: own.clone(),
            tcp_addrs: own,
            metrics,
            tasks,
            shards,
        })
    }

    /// The UDP addresses served, one per listen address (ports resolved).
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// The TCP addresses served, one per listen address (ports resolved).
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        self.metrics.clone()
    }

    /// Stops accepting queries.
    pub fn shutdown(self) {
        drop(self);
    }
}

type Bound = (Vec<std::net::UdpSocket>, std::net::TcpListener, SocketAddr);

fn bind_listen(addr: SocketAddr, config: &ProxyConfig) -> Result<Bound, DnsProxyError> {
    let listen_err = |transport, addr, source| DnsProxyError::Listen {
        transport,
        addr,
        source,
    };
    let attempts = if addr.port() == 0 { PORT_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let first =
            net::udp_listener(addr, config.transparent).map_err(|e| listen_err("udp", addr, e))?;
        let bound = first.local_addr().map_err(|e| listen_err("udp", addr, e))?;
        let tcp = match net::tcp_listener(bound, config.transparent) {
            Ok(t) => t,
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(listen_err("tcp", bound, e)),
        };
        let mut udp = vec![first];
        for _ in 1..config.udp_sockets_per_listen {
            let s = net::udp_listener(bound, config.transparent)
                .map_err(|e| listen_err("udp", bound, e))?;
            udp.push(s);
        }
        if udp.len() > 1 {
            // Best effort: without it the kernel's 4-tuple hash still spreads clients.
            if let Err(e) = net::steer_by_cpu(&udp[0], udp.len() as u32) {
                debug!(%bound, error = %e, "UDP listeners keep the kernel's hash steering");
            }
        }
        return Ok((udp, tcp, bound));
    }
    Err(listen_err(
        "tcp",
        addr,
        last.unwrap_or_else(|| io::Error::other("no free port")),
    ))
}

impl<P: DnsPolicy, L: Learner> Shared<P, L> {
    fn copy(&self) -> Shared<P, L> {
        Shared {
            config: self.config.clone(),
            policy: self.policy.clone(),
            learner: self.learner.clone(),
            original_dst: self.original_dst.clone(),
            metrics: self.metrics.clone(),
            own: self.own.clone(),
            next_upstream: AtomicUsize::new(self.next_upstream.load(Relaxed)),
            realtime: self.realtime.clone(),
        }
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own
            .iter()
            .any(|o| o.port() == addr.port() && (o.ip() == addr.ip() || o.ip().is_unspecified()))
    }

    /// The server a query goes to: the original destination when one is known (the hook's,
    /// else the socket's in transparent mode, unless the query was sent to the proxy itself),
    /// else the next configured upstream.
    fn server_for(
        &self,
        client: SocketAddr,
        received_on: SocketAddr,
        transport: Transport,
    ) -> Option<SocketAddr> {
        let original = self
            .original_dst
            .as_ref()
            .and_then(|h| h.original_dst(client, received_on, transport))
            .or_else(|| {
                (self.config.transparent && !self.is_own(received_on)).then_some(received_on)
            });
        original.or_else(|| {
            let ups = &self.config.upstreams;
            (!ups.is_empty()).then(|| ups[self.next_upstream.fetch_add(1, Relaxed) % ups.len()])
        })
    }

    /// First step of every query: judge the bytes, find the server, ask the policy. Either the
    /// query is finished here (an answer of the proxy's own, or a drop) or it is to be
    /// forwarded (the caller forwards `bytes`).
    fn judge(
        &self,
        bytes: &[u8],
        client: SocketAddr,
        received_on: SocketAddr,
        transport: Transport,
    ) -> Judged {
        let ClientQuery { qname, meta } = match parse_client_query(bytes) {
            Ok(q) => q,
            Err(Rejection::Drop(reason)) => {
                self.metrics.malformed_dropped.fetch_add(1, Relaxed);
                debug!(%client, transport = transport.as_str(), reason, len = bytes.len(), "dropped a malformed packet");
                return Judged::Done(None);
            }
            Err(Rejection::Answer {
                response,
                rcode,
                reason,
            }) => {
                self.metrics
                    .count_query(Verdict::Invalid, Some(u16::from(rcode)));
                debug!(%client, transport = transport.as_str(), %rcode, reason, "answered a query that is not served");
                return Judged::Done(Some(response));
            }
        };
        let Some(server) = self.server_for(client, received_on, transport) else {
            self.metrics
                .count_query(Verdict::Invalid, Some(u16::from(ResponseCode::ServFail)));
            warn!(%client, "query sent to the proxy itself and no upstream configured");
            return Judged::Done(Some(meta.servfail()));
        };
        let decision = self.policy.check(client, server, transport, &qname);
        let endpoint_id = match decision {
            Decision::Allow { endpoint_id } => endpoint_id,
            Decision::Deny { .. } | Decision::UnknownEndpoint => 0,
        };
        let fwd = Forward {
            ctx: QueryContext {
                endpoint_id,
                client,
                server,
                transport,
                qname,
                qtype: meta.question.qtype,
            },
            meta,
            decision,
        };
        if let Decision::Allow { .. } = decision {
            return Judged::Forward(fwd);
        }
        let rcode = match self.config.reject_code {
            RejectCode::Refused => ResponseCode::Refused,
            RejectCode::NameError => ResponseCode::NXDomain,
        };
        let verdict = if decision == Decision::UnknownEndpoint {
            Verdict::UnknownEndpoint
        } else {
            Verdict::Denied
        };
        self.metrics.count_query(verdict, Some(u16::from(rcode)));
        self.observe(&fwd, Some(rcode.into()), None, Duration::ZERO);
        Judged::Done(Some(fwd.meta.reject(rcode)))
    }

    /// Second step: what came back from upstream (lent in the receive buffer). A failure or
    /// an answer that teaches nothing is finished here, the answer sent from where it lies;
    /// an answer that teaches IPs comes back (copied) with the learner's future, to be
    /// released when it resolves (or `responseMaxDelay` passes).
    /// `at`: when the pool finished with the query (the answer's receipt): the hold time
    /// counts from there.
    fn on_answer<'a>(
        &self,
        fwd: &Forward,
        result: Result<&'a mut [u8], UpstreamError>,
        at: Instant,
    ) -> Answered<'a> {
        let answer = match result {
            Ok(a) => a,
            Err(UpstreamError::Timeout) => {
                self.metrics.upstream_timeouts.fetch_add(1, Relaxed);
                self.metrics.count_query(Verdict::Allowed, None);
                debug!(client = %fwd.ctx.client, server = %fwd.ctx.server, qname = %fwd.ctx.qname, "upstream timeout, no reply");
                self.observe(fwd, None, None, Duration::ZERO);
                return Answered::Done(None);
            }
            Err(UpstreamError::Failed(why)) => {
                return Answered::Done(Some(Cow::Owned(self.upstream_failed(fwd, &why))))
            }
        };
        // Every answer is read whole before it reaches a client: a malformed one is a
        // failure of the upstream, answered SERVFAIL. The common answers are read in place
        // (into the thread's scratch answer, no allocation); the rest, and every doubtful
        // one, by hickory.
        let rcode = header_rcode(answer);
        let min_ttl = self.config.min_ttl;
        let mut learned = LEARNED.take();
        let fast = if fwd.meta.plain {
            fast_answer(answer, &fwd.ctx.qname, min_ttl, rcode == 0, &mut learned)
        } else {
            None
        };
        let teaches = match fast {
            Some(teaches) => teaches,
            None => match Message::from_vec(answer) {
                Ok(msg) if rcode == 0 => {
                    match extract_learning(&msg, &fwd.meta.question.name(), min_ttl) {
                        Some(l) => {
                            learned = l;
                            true
                        }
                        None => false,
                    }
                }
                Ok(_) => false,
                Err(e) => {
                    let why = format!("malformed answer: {e}");
                    return Answered::Done(Some(Cow::Owned(self.upstream_failed(fwd, &why))));
                }
            },
        };
        if !teaches {
            LEARNED.set(learned);
            let reply = self.release(fwd, answer, rcode, None, None);
            return Answered::Done(Some(Cow::Borrowed(reply)));
        }
        // The hold counts from the answer's receipt: reading it and the learner's call (a
        // datapath may do its work inside it) are part of it.
        let mut confirm = self.learner.learn(&fwd.ctx, &learned);
        // Usually the datapath has confirmed already (the IPs were known, or the update is
        // synchronous): look once, in place, before keeping the future anywhere.
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(outcome) = Pin::new(&mut confirm).poll(&mut cx) {
            let waited = self.hold_done(fwd, &learned, at, Some(outcome));
            let reply = self.release(fwd, answer, rcode, Some(&learned), Some(waited));
            LEARNED.set(learned);
            return Answered::Done(Some(Cow::Borrowed(reply)));
        }
        let held = HeldAnswer {
            answer: answer.to_vec(),
            rcode,
            learned,
            since: at,
        };
        Answered::Hold(held, Box::pin(confirm))
    }

    /// The end of a hold that began at `since`: `outcome` is the learner's word, `None` when
    /// `responseMaxDelay` passed first. Counted and logged; returns how long it was.
    fn hold_done(
        &self,
        fwd: &Forward,
        learned: &LearnedAnswer,
        since: Instant,
        outcome: Option<HoldOutcome>,
    ) -> Duration {
        let waited = since.elapsed();
        self.metrics.hold_time.observe(waited);
        match outcome {
            Some(HoldOutcome::Enforceable) => {}
            Some(HoldOutcome::Failed(why)) => {
                self.metrics.hold_failures.fetch_add(1, Relaxed);
                warn!(client = %fwd.ctx.client, qname = %fwd.ctx.qname, ips = ?learned.ips, why, "datapath could not take the learned IPs; response released");
            }
            None => {
                self.metrics.hold_timeouts.fetch_add(1, Relaxed);
                warn!(client = %fwd.ctx.client, qname = %fwd.ctx.qname, ips = ?learned.ips, max_delay = ?self.config.response_max_delay, "datapath did not confirm in time; response released");
            }
        }
        waited
    }

    /// Last step of a held answer: `outcome` is the learner's word, `None` when
    /// `responseMaxDelay` passed first.
    fn release_held(
        &self,
        fwd: &Forward,
        held: HeldAnswer,
        outcome: Option<HoldOutcome>,
    ) -> Vec<u8> {
        let HeldAnswer {
            mut answer,
            rcode,
            learned,
            since,
        } = held;
        let waited = self.hold_done(fwd, &learned, since, outcome);
        self.release(fwd, &mut answer, rcode, Some(&learned), Some(waited));
        answer
    }

    /// The client's ID back in, counted, observed.
    fn release<'a>(
        &self,
        fwd: &Forward,
        answer: &'a mut [u8],
        rcode: u16,
        learned: Option<&LearnedAnswer>,
        held: Option<Duration>,
    ) -> &'a [u8] {
        set_id(answer, fwd.meta.id);
        self.metrics.count_query(Verdict::Allowed, Some(rcode));
        self.observe(fwd, Some(rcode), learned, held.unwrap_or_default());
        answer
    }

    /// A TCP query from bytes to the answer to send (`None`: no reply).
    async fn handle_tcp(
        &self,
        bytes: Vec<u8>,
        client: SocketAddr,
        received_on: SocketAddr,
    ) -> Option<Vec<u8>> {
        let fwd = match self.judge(&bytes, client, received_on, Transport::Tcp) {
            Judged::Done(reply) => return reply,
            Judged::Forward(fwd) => fwd,
        };
        let (timeout, mark) = (self.config.forward_timeout, self.config.upstream_mark);
        let mut result = tcp_exchange(
            fwd.ctx.server,
            &fwd.meta.question,
            bytes,
            timeout,
            mark,
            &self.metrics,
        )
        .await;
        let result = result.as_deref_mut().map_err(|e| e.clone());
        match self.on_answer(&fwd, result, Instant::now()) {
            Answered::Done(reply) => reply.map(Cow::into_owned),
            Answered::Hold(held, confirm) => {
                let outcome = tokio::time::timeout(self.config.response_max_delay, confirm)
                    .await
                    .ok();
                Some(self.release_held(&fwd, held, outcome))
            }
        }
    }

    fn udp_answered(
        self: &Arc<Self>,
        waiting: UdpWaiting<P, L>,
        result: Result<&mut [u8], UpstreamError>,
        at: Instant,
    ) {
        let client = waiting.fwd.ctx.client;
        match self.on_answer(&waiting.fwd, result, at) {
            Answered::Done(Some(reply)) => waiting.reply_to.send(client, &reply),
            Answered::Done(None) => {}
            Answered::Hold(held, confirm) => {
                let max_delay = self.config.response_max_delay;
                let shared = self.clone();
                tokio::spawn(async move {
                    let outcome = tokio::time::timeout(max_delay, confirm).await.ok();
                    let reply = shared.release_held(&waiting.fwd, held, outcome);
                    waiting.reply_to.send(client, &reply);
                });
            }
        }
    }

    fn upstream_failed(&self, fwd: &Forward, why: &str) -> Vec<u8> {
        self.metrics.upstream_failures.fetch_add(1, Relaxed);
        self.metrics
            .count_query(Verdict::Allowed, Some(u16::from(ResponseCode::ServFail)));
        warn!(client = %fwd.ctx.client, server = %fwd.ctx.server, qname = %fwd.ctx.qname, why, "upstream failed, answering SERVFAIL");
        self.observe(
            fwd,
            Some(u16::from(ResponseCode::ServFail)),
            None,
            Duration::ZERO,
        );
        fwd.meta.servfail()
    }

    fn observe(
        &self,
        fwd: &Forward,
        rcode: Option<u16>,
        learned: Option<&LearnedAnswer>,
        hold: Duration,
    ) {
        if !self.learner.observing() {
            return;
        }
        self.learner.observe(&QueryEvent {
            client: fwd.ctx.client,
            server: fwd.ctx.server,
            transport: fwd.ctx.transport,
            qname: fwd.ctx.qname.clone(),
            qtype: fwd.ctx.qtype,
            decision: fwd.decision,
            rcode,
            learned: learned.cloned(),
            hold,
        });
    }
}

thread_local! {
    /// The answer the fast path reads into, kept between answers: its vectors are reused
    /// unless the answer is held (then it goes with it and a new one starts empty).
    static LEARNED: Cell<LearnedAnswer> = const {
        Cell::new(LearnedAnswer { chain: Vec::new(), ips: Vec::new(), ttl: 0 })
    };
}

/// A UDP query at the upstream pool: its continuation is [`Shared::udp_answered`].
struct UdpWaiting<P, L> {
    fwd: Forward,
    reply_to: UdpReply,
    _shared: std::marker::PhantomData<fn() -> Shared<P, L>>,
}

impl<P: DnsPolicy, L: Learner> Waiting for UdpWaiting<P, L> {
    type Context = Arc<Shared<P, L>>;

    fn question(&self) -> &Question {
        &self.fwd.meta.question
    }

    fn done(
        self,
        shared: &Arc<Shared<P, L>>,
        result: Result<&mut [u8], UpstreamError>,
        at: Instant,
    ) {
        shared.udp_answered(self, result, at);
    }
}

/// A query on its way: who asked whom what (the learner's context, which owns the name),
/// what the policy said, and what answers must match and echo.
struct Forward {
    meta: QueryMeta,
    ctx: QueryContext,
    decision: Decision,
}

// Built and moved once per query: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Judged {
    /// Finished: this answer (or none) goes to the client.
    Done(Option<Vec<u8>>),
    /// To be forwarded (the client's message as it came).
    Forward(Forward),
}

type Confirmation = Pin<Box<dyn Future<Output = HoldOutcome> + Send>>;

#[allow(clippy::large_enum_variant)] // as for Judged
enum Answered<'a> {
    /// The reply: the upstream's answer in place (ID restored), or one of the proxy's own.
    Done(Option<Cow<'a, [u8]>>),
    /// Released when the confirmation resolves (bounded by responseMaxDelay); it was not
    /// ready when first asked.
    Hold(HeldAnswer, Confirmation),
}

/// An answer kept until the datapath confirms (its query's [`Forward`] stays with the caller).
struct HeldAnswer {
    answer: Vec<u8>,
    rcode: u16,
    learned: LearnedAnswer,
    since: Instant,
}

/// Where a UDP answer to a client goes: from the listener, or in transparent mode from the
/// address the client sent to (`from`).
struct UdpReply {
    listener: Arc<std::net::UdpSocket>,
    from: Option<(SocketAddr, Arc<ReplySockets>)>,
}

/// Transparent mode: sockets bound (IP_TRANSPARENT) to the original destinations answers
/// must come from, one per address and shard, kept for reuse. DNS servers are few, so the
/// table stays small; past `MAX_REPLY_SOCKETS` it starts over. These sockets only send: the
/// datapath steers intercepted queries to the listeners explicitly (bpf_sk_assign, TPROXY),
/// never by a lookup that could find them.
#[derive(Default)]
struct ReplySockets(std::sync::Mutex<HashMap<SocketAddr, Arc<std::net::UdpSocket>>>);

const MAX_REPLY_SOCKETS: usize = 256;

impl ReplySockets {
    fn get(&self, from: SocketAddr) -> io::Result<Arc<std::net::UdpSocket>> {
        let mut map = self.0.lock().expect("reply sockets lock");
        if let Some(s) = map.get(&from) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_REPLY_SOCKETS {
            map.clear();
        }
        let s = Arc::new(net::udp_reply_from(from)?);
        map.insert(from, s.clone());
        Ok(s)
    }

    fn forget(&self, from: SocketAddr) {
        self.0.lock().expect("reply sockets lock").remove(&from);
    }
}

impl UdpReply {
    fn send(&self, client: SocketAddr, answer: &[u8]) {
        if self.from.is_none() && replies::queue(&self.listener, client, answer) {
            return;
        }
        self.send_now(client, answer)
    }

    fn send_now(&self, client: SocketAddr, answer: &[u8]) {
        let sent = match &self.from {
            // The client asked another server: the answer must come from that address.
            Some((from, sockets)) => {
                let sent = sockets.get(*from).and_then(|s| s.send_to(answer, client));
                if sent
                    .as_ref()
                    .is_err_and(|e| e.kind() != io::ErrorKind::WouldBlock)
                {
                    sockets.forget(*from);
                }
                sent
            }
            // A blocking socket: a full buffer is waited on, at most net::SEND_WAIT.
            None => self.listener.send_to(answer, client),
        };
        if let Err(e) = sent {
            debug!(%client, error = %e, "UDP answer not sent");
        }
    }
}

/// One UDP shard: a thread per listen socket that blocks receiving queries, and the shard's
/// upstream pool with a thread per socket that blocks receiving answers (as dnsdist's
/// listener and responder threads do: a datagram costs one wake-up and one receive call, no
/// reactor in between). This thread runs the shard's current-thread runtime, which the
/// receiving threads enter: the answers the datapath keeps waiting, and the pool's timeout
/// sweeper, are tasks on it. It runs until `stop` fires (or its sender is dropped).
fn run_shard<P: DnsPolicy, L: Learner>(
    index: usize,
    shared: Arc<Shared<P, L>>,
    listeners: Vec<Arc<std::net::UdpSocket>>,
    pool_sockets: usize,
    stopping: Arc<AtomicBool>,
    ready: oneshot::Sender<Result<(), DnsProxyError>>,
    stop: oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(DnsProxyError::Shard(e)));
            return;
        }
    };
    let pool = match UdpPool::start(
        pool_sockets,
        &shared.config.upstreams,
        shared.config.upstream_mark,
        shared.metrics.clone(),
        PoolThreads {
            runtime: rt.handle(),
            name: &format!("dns-up-{index}"),
            realtime: shared.realtime.clone(),
        },
        shared.clone(),
    ) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let _ = ready.send(Err(DnsProxyError::UpstreamSocket(e)));
            return;
        }
    };
    let replies = Arc::new(ReplySockets::default());
    for (j, socket) in listeners.into_iter().enumerate() {
        let (shared, replies) = (shared.clone(), replies.clone());
        let (stopping, runtime, in_pool) = (stopping.clone(), rt.handle().clone(), pool.clone());
        let (set_up, setting_up) = std::sync::mpsc::channel::<()>();
        let started = std::thread::Builder::new()
            .name(format!("dns-in-{index}-{j}"))
            .spawn(move || {
                let _on = runtime.enter();
                // Its priority is in force before the proxy says it serves.
                let batch =
                    net::RecvBatch::new(MAX_UDP_QUERY).with_priority(shared.realtime.as_ref());
                drop(set_up);
                serve_udp(&shared, &socket, batch, &in_pool, &replies, &stopping)
            });
        if let Err(e) = started {
            pool.stop();
            let _ = ready.send(Err(DnsProxyError::Shard(e)));
            return;
        }
        // Returns once the thread dropped its end.
        let _ = setting_up.recv();
    }
    let _ = ready.send(Ok(()));
    rt.block_on(async move {
        let _ = stop.await;
    });
    pool.stop();
}

/// A listener thread: receives batches of queries until `stopping`.
fn serve_udp<P: DnsPolicy, L: Learner>(
    shared: &Arc<Shared<P, L>>,
    socket: &Arc<std::net::UdpSocket>,
    mut batch: net::RecvBatch,
    pool: &UdpPool<UdpWaiting<P, L>>,
    replies: &Arc<ReplySockets>,
    stopping: &AtomicBool,
) {
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "UDP listener has no local address; not serving it");
            return;
        }
    };
    let fd = socket.as_raw_fd();
    while let Some(result) = batch.recv_until(fd, stopping) {
        let got = match result {
            Ok(n) => n,
            Err(e) => {
                warn!(%local, error = %e, "UDP receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // One clock read per batch: the queries' time of receipt.
        let received = Instant::now();
        replies::batch(|| {
            for i in 0..got {
                shared.serve_datagram(batch.get(i), received, local, socket, pool, replies);
            }
            pool.flush();
        });
    }
}

impl<P: DnsPolicy, L: Learner> Shared<P, L> {
    /// One datagram a listener received.
    /// One datagram a listener received (`received`: when its batch was read): finished at
    /// once, or handed to the pool with its continuation. No task is spawned unless the
    /// datapath keeps an answer waiting.
    fn serve_datagram(
        self: &Arc<Self>,
        d: net::Datagram<'_>,
        received: Instant,
        local: SocketAddr,
        listener: &Arc<std::net::UdpSocket>,
        pool: &UdpPool<UdpWaiting<P, L>>,
        replies: &Arc<ReplySockets>,
    ) {
        let Some(client) = d.src else {
            self.metrics.malformed_dropped.fetch_add(1, Relaxed);
            debug!(%local, "dropped a datagram without an IP source address");
            return;
        };
        if d.truncated {
            self.metrics.malformed_dropped.fetch_add(1, Relaxed);
            debug!(%client, "dropped an oversized UDP query");
            return;
        }
        let received_on = d.dst.unwrap_or(local);
        let reply_to = UdpReply {
            listener: listener.clone(),
            from: (self.config.transparent && !self.is_own(received_on))
                .then(|| (received_on, replies.clone())),
        };
        let fwd = match self.judge(d.bytes, client, received_on, Transport::Udp) {
            Judged::Done(Some(reply)) => return reply_to.send(client, &reply),
            Judged::Done(None) => return,
            Judged::Forward(fwd) => fwd,
        };
        pool.send(
            fwd.ctx.server,
            d.bytes,
            received,
            self.config.forward_timeout,
            UdpWaiting {
                fwd,
                reply_to,
                _shared: std::marker::PhantomData,
            },
        );
    }
}

async fn serve_tcp<P: DnsPolicy, L: Learner>(
    shared: Arc<Shared<P, L>>,
    listener: TcpListener,
    limit: Arc<Semaphore>,
) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics.tcp_rejected.fetch_add(1, Relaxed);
            debug!(%client, "TCP connection limit reached; closing");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.metrics.tcp_open.fetch_add(1, Relaxed);
            serve_tcp_connection(&shared, stream, client).await;
            shared.metrics.tcp_open.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

/// Serves one TCP connection: frames are read as they come and each query is answered as soon
/// as it completes (out of order, RFC 7766 pipelining); at most
/// `tcp_max_inflight_per_connection` are worked on at once. The connection closes after
/// `tcp_idle_timeout` without a query and nothing in flight, or when the client closes, once
/// every answer in flight is written.
async fn serve_tcp_connection<P: DnsPolicy, L: Learner>(
    shared: &Arc<Shared<P, L>>,
    stream: TcpStream,
    client: SocketAddr,
) {
    // With IP_TRANSPARENT, the local address of an accepted connection is its original
    // destination.
    let received_on = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    stream.set_nodelay(true).ok();
    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(Mutex::new(writer));
    let max_inflight = shared.config.tcp_max_inflight_per_connection;
    let inflight = Arc::new(Semaphore::new(max_inflight));
    let idle = shared.config.tcp_idle_timeout;
    // Last query read or answer written: the idle timeout counts from there.
    let last_activity = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut frames = FrameReader::default();
    loop {
        let deadline = *last_activity.lock().expect("activity lock") + idle;
        let frame = match tokio::time::timeout_at(deadline.into(), frames.next(&mut reader)).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) | Ok(Err(_)) => break, // closed or reset
            Err(_) => {
                let busy = inflight.available_permits() < max_inflight;
                let quiet_since = *last_activity.lock().expect("activity lock");
                if busy || quiet_since.elapsed() < idle {
                    continue;
                }
                debug!(%client, "TCP connection idle; closing");
                break;
            }
        };
        *last_activity.lock().expect("activity lock") = Instant::now();
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        let writer = writer.clone();
        let last_activity = last_activity.clone();
        tokio::spawn(async move {
            if let Some(answer) = shared.handle_tcp(frame, client, received_on).await {
                let Ok(len) = u16::try_from(answer.len()) else {
                    return;
                };
                let mut framed = Vec::with_capacity(answer.len() + 2);
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(&answer);
                let mut w = writer.lock().await;
                if let Err(e) = w.write_all(&framed).await {
                    debug!(%client, error = %e, "TCP answer not sent");
                }
                *last_activity.lock().expect("activity lock") = Instant::now();
            }
            drop(permit);
        });
    }
    // Let the answers in flight go out before the connection closes.
    let _ = inflight.acquire_many(max_inflight as u32).await;
    let mut w = writer.lock().await;
    let _ = w.shutdown().await;
}

/// Splits a TCP byte stream into length-prefixed DNS messages. Cancel-safe: bytes read before
/// a timeout stay buffered for the next call.
#[derive(Default)]
struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next whole frame; `None` when the peer closed (a partial frame at close is
    /// dropped).
    async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.buf.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
                if self.buf.len() >= 2 + len {
                    let frame = self.buf[2..2 + len].to_vec();
                    self.buf.drain(..2 + len);
                    return Ok(Some(frame));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
