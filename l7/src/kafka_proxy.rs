//! The Kafka proxy: reads request frames, judges each against the rules in force when it
//! arrives, forwards allowed ones unchanged and answers denied ones itself.
//!
//! Kafka clients expect responses in request order on a connection, so a denial cannot be
//! written back the moment it is decided while earlier requests still wait for the broker.
//! Every request that expects a response leaves an entry in an ordered queue: "the broker
//! answers this one" or "here is our answer". The response side writes the broker's
//! responses and our own in that order. The request side and the response side run
//! concurrently, so a broker that answers while we are still writing a large request to it
//! never deadlocks against us.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::error::L7Error;
use crate::events::{EventSink, L7Event, L7EventKind, L7Protocol, L7Verdict, ProtocolStats};
use crate::kafka_codec::{self, RequestHead, TOPIC_AUTHORIZATION_FAILED};
use crate::kafka_rules::{KafkaDecision, KafkaRequestView, RequestTopics};
use crate::net::{self, ProxyMode};
use crate::policy::{FlowKey, L7PolicySource};

/// Configuration of one Kafka proxy listener.
#[derive(Debug, Clone)]
pub struct KafkaProxyConfig {
    pub listen: SocketAddr,
    pub mode: ProxyMode,
    /// Largest request or response frame accepted (Kafka's `socket.request.max.bytes`).
    pub max_frame: usize,
    pub connect_timeout: Duration,
}

impl KafkaProxyConfig {
    pub fn new(listen: SocketAddr, mode: ProxyMode) -> Self {
        KafkaProxyConfig {
            listen,
            mode,
            max_frame: kafka_codec::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

struct Shared {
    cfg: KafkaProxyConfig,
    policy: Arc<dyn L7PolicySource>,
    events: EventSink,
    local: SocketAddr,
    /// Topic ID → name per broker, learned from Metadata responses. Shared by all
    /// connections: clients fetch metadata on one connection and fetch records by topic ID
    /// on another.
    topic_ids: Mutex<HashMap<SocketAddr, HashMap<[u8; 16], String>>>,
}

/// Topic IDs remembered per broker; a cluster with more topics than this is answered from
/// what was learned first (an unknown ID matches no topic rule: fail closed).
const MAX_TOPIC_IDS: usize = 100_000;

/// Serves Kafka connections however they were accepted. Cheap to clone.
#[derive(Clone)]
pub struct KafkaProxyService {
    shared: Arc<Shared>,
}

/// A bound Kafka proxy listener.
pub struct KafkaProxy {
    listener: TcpListener,
    service: KafkaProxyService,
}

impl KafkaProxy {
    /// Binds the listener (with `IP_TRANSPARENT` in transparent mode). Call within a Tokio
    /// runtime.
    pub fn bind(
        cfg: KafkaProxyConfig,
        policy: Arc<dyn L7PolicySource>,
        events: EventSink,
    ) -> Result<KafkaProxy, L7Error> {
        let listener =
            net::bind_listener(cfg.listen, cfg.mode.is_transparent()).map_err(|source| {
                L7Error::Bind {
                    addr: cfg.listen,
                    source,
                }
            })?;
        let local = listener.local_addr().map_err(|source| L7Error::Io {
            what: "reading the listener's address",
            source,
        })?;
        Ok(KafkaProxy {
            listener,
            service: KafkaProxyService {
                shared: Arc::new(Shared {
                    cfg,
                    policy,
                    events,
                    local,
                    topic_ids: Mutex::default(),
                }),
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.service.shared.local
    }

    pub fn service(&self) -> KafkaProxyService {
        self.service.clone()
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self) {
        let mode = self.service.shared.cfg.mode;
        let svc = self.service;
        net::accept_loop(self.listener, mode, "kafka", move |stream, src, dst| {
            let svc = svc.clone();
            async move { svc.serve(stream, src, dst).await }
        })
        .await
    }
}

/// Who answers a request, in request order.
enum Pending {
    /// The broker; its response must carry this correlation id.
    Broker {
        correlation_id: i32,
        api_key: i16,
        api_version: i16,
    },
    /// We do: a complete response frame.
    Local(Bytes),
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("malformed request: {0}")]
    Malformed(kafka_codec::KafkaParseError),
    #[error("malformed response from the broker: {0}")]
    BadResponse(String),
    #[error("no well-formed denial exists for {0} v{1}; closing the connection")]
    NoDenial(&'static str, i16),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl KafkaProxyService {
    /// A service without a listener (the caller accepts connections itself).
    pub fn new(
        cfg: KafkaProxyConfig,
        policy: Arc<dyn L7PolicySource>,
        events: EventSink,
    ) -> KafkaProxyService {
        let local = cfg.listen;
        KafkaProxyService {
            shared: Arc::new(Shared {
                cfg,
                policy,
                events,
                local,
                topic_ids: Mutex::default(),
            }),
        }
    }

    fn stats(&self) -> &ProtocolStats {
        &self.shared.events.stats().kafka
    }

    /// Serves one client connection whose requests go to the broker at `dst`.
    pub async fn serve<IO>(&self, io: IO, src: SocketAddr, dst: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        ProtocolStats::bump(&self.stats().connections);
        let local = self.shared.local;
        if self.shared.cfg.mode.is_transparent()
            && (dst == local
                || (local.ip().is_unspecified()
                    && dst.port() == local.port()
                    && dst.ip().is_loopback()))
        {
            tracing::debug!(%src, "kafka proxy: refusing a connection made to the proxy itself");
            return;
        }
        let cfg = &self.shared.cfg;
        let broker = match tokio::time::timeout(
            cfg.connect_timeout,
            net::connect_marked(dst, cfg.mode.mark()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                ProtocolStats::bump(&self.stats().upstream_errors);
                tracing::debug!(%src, %dst, error = %e, "kafka proxy: broker unreachable");
                return;
            }
            Err(_) => {
                ProtocolStats::bump(&self.stats().upstream_errors);
                tracing::debug!(%src, %dst, "kafka proxy: broker connect timed out");
                return;
            }
        };
        let (client_rd, client_wr) = tokio::io::split(io);
        let (broker_rd, broker_wr) = broker.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = FlowKey { src, dst };
        let requests = async {
            let r = self.requests(client_rd, broker_wr, tx, flow).await;
            // Counted before the client's side closes (it closes when `responses` is
            // dropped below), so whoever sees the close sees the count.
            if let Err(ConnError::Malformed(e)) = &r {
                ProtocolStats::bump(&self.stats().malformed);
                tracing::debug!(%src, error = %e, "kafka proxy: malformed request, connection closed");
            }
            r
        };
        let responses = self.responses(broker_rd, client_wr, rx, dst);
        // Either side ending ends the connection: a client gone, a broker gone, or a
        // malformed frame that leaves no way to stay in step.
        let res = tokio::select! {
            r = requests => r,
            r = responses => r,
        };
        match res {
            Ok(()) | Err(ConnError::Malformed(_)) => {}
            Err(e) => tracing::debug!(%src, error = %e, "kafka proxy: connection closed"),
        }
    }

    async fn requests<R, W>(
        &self,
        mut client: R,
        mut broker: W,
        tx: mpsc::UnboundedSender<Pending>,
        flow: FlowKey,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.shared.cfg.max_frame;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            while let Some(len) = kafka_codec::frame_len(&buf, max).map_err(ConnError::Malformed)? {
                if buf.len() < len {
                    buf.reserve(len - buf.len());
                    break;
                }
                let frame = buf.split_to(len).freeze();
                match self.judge(&frame, flow)? {
                    Judged::Forward(pending) => {
                        broker.write_all(&frame).await?;
                        if let Some(p) = pending {
                            // The response side has gone only if the connection is ending.
                            let _ = tx.send(p);
                        }
                    }
                    Judged::Answer(p) => {
                        if let Some(p) = p {
                            let _ = tx.send(p);
                        }
                    }
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
            if client.read_buf(&mut buf).await? == 0 {
                let _ = broker.shutdown().await;
                return Ok(());
            }
        }
    }

    fn judge(&self, frame: &Bytes, flow: FlowKey) -> Result<Judged, ConnError> {
        let body = frame.slice(4..);
        let head = kafka_codec::parse_head(&body).map_err(ConnError::Malformed)?;
        let decoded = kafka_codec::decode_body(&head, &body);
        let topics = match &decoded {
            Some(b) => {
                let all = self
                    .shared
                    .topic_ids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let ids = all.get(&flow.dst);
                kafka_codec::request_topics(b, &|id| ids.and_then(|m| m.get(id)).cloned())
            }
            None => RequestTopics::Unknown,
        };
        let redirect = self.shared.policy.kafka(&flow);
        let decision = match &redirect {
            None => KafkaDecision::Denied,
            Some(r) => r.policy.check(&KafkaRequestView {
                api_key: head.api_key,
                api_version: head.api_version,
                client_id: head.client_id.as_deref(),
                topics: &topics,
            }),
        };
        let expects = kafka_codec::expects_response(decoded.as_ref());
        let (verdict, judged, error_code) = match decision {
            KafkaDecision::Allowed => {
                let pending = expects.then_some(Pending::Broker {
                    correlation_id: head.correlation_id,
                    api_key: head.api_key,
                    api_version: head.api_version,
                });
                (L7Verdict::Allowed, Judged::Forward(pending), None)
            }
            KafkaDecision::Denied if !expects => (L7Verdict::Denied, Judged::Answer(None), None),
            KafkaDecision::Denied => {
                match kafka_codec::denied_response(
                    &head,
                    decoded.as_ref(),
                    TOPIC_AUTHORIZATION_FAILED,
                ) {
                    Some(resp) => (
                        L7Verdict::Denied,
                        Judged::Answer(Some(Pending::Local(resp))),
                        Some(TOPIC_AUTHORIZATION_FAILED),
                    ),
                    None => {
                        self.emit(
                            &flow,
                            redirect.as_ref(),
                            L7Verdict::Denied,
                            &head,
                            &topics,
                            None,
                        );
                        return Err(ConnError::NoDenial(head.api_name(), head.api_version));
                    }
                }
            }
        };
        self.emit(
            &flow,
            redirect.as_ref(),
            verdict,
            &head,
            &topics,
            error_code,
        );
        Ok(judged)
    }

    fn emit(
        &self,
        flow: &FlowKey,
        redirect: Option<&crate::policy::Redirect<crate::kafka_rules::KafkaPolicy>>,
        verdict: L7Verdict,
        head: &RequestHead,
        topics: &RequestTopics,
        error_code: Option<i16>,
    ) {
        let topics = match topics {
            RequestTopics::Known(t) => t
                .iter()
                .map(|t| t.clone().unwrap_or_else(|| "<unknown topic id>".into()))
                .collect(),
            RequestTopics::Unknown => Vec::new(),
        };
        self.shared.events.emit(L7Event {
            time: SystemTime::now(),
            protocol: L7Protocol::Kafka,
            src: flow.src,
            dst: flow.dst,
            endpoint_id: redirect.map(|r| r.endpoint_id),
            endpoint: redirect.map(|r| r.endpoint.clone()),
            remote_identity: redirect.map(|r| r.remote_identity),
            verdict,
            kind: L7EventKind::Kafka {
                api_key: head.api_key,
                api_key_name: head.api_name(),
                api_version: head.api_version,
                correlation_id: head.correlation_id,
                client_id: head.client_id.clone(),
                topics,
                error_code,
            },
        });
    }

    async fn responses<R, W>(
        &self,
        mut broker: R,
        mut client: W,
        mut rx: mpsc::UnboundedReceiver<Pending>,
        dst: SocketAddr,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.shared.cfg.max_frame;
        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut requests_open = true;
        loop {
            // Our own answers go out as soon as every earlier response has.
            while let Some(Pending::Local(_)) = queue.front() {
                if let Some(Pending::Local(resp)) = queue.pop_front() {
                    client.write_all(&resp).await?;
                }
            }
            if !requests_open && queue.is_empty() {
                return Ok(());
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
            tokio::select! {
                p = rx.recv(), if requests_open => match p {
                    Some(p) => queue.push_back(p),
                    None => requests_open = false,
                },
                n = broker.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    // Queue entries sent before this response was read may still be in the
                    // channel.
                    while let Ok(p) = rx.try_recv() {
                        queue.push_back(p);
                    }
                    while let Some(len) = kafka_codec::frame_len(&buf, max).map_err(|e| ConnError::BadResponse(e.to_string()))? {
                        if buf.len() < len {
                            buf.reserve(len - buf.len());
                            break;
                        }
                        let frame = buf.split_to(len).freeze();
                        // Flush our answers that precede this response.
                        while let Some(Pending::Local(_)) = queue.front() {
                            if let Some(Pending::Local(resp)) = queue.pop_front() {
                                client.write_all(&resp).await?;
                            }
                        }
                        let Some(Pending::Broker { correlation_id, api_key, api_version }) = queue.pop_front() else {
                            return Err(ConnError::BadResponse("a response nobody asked for".into()));
                        };
                        let got = kafka_codec::response_correlation_id(&frame[4..]);
                        if got != Some(correlation_id) {
                            return Err(ConnError::BadResponse(format!(
                                "correlation id {got:?}, expected {correlation_id}"
                            )));
                        }
                        if api_key == ApiKey::Metadata as i16 {
                            let learned = kafka_codec::metadata_topic_ids(api_version, &frame.slice(4..));
                            if !learned.is_empty() {
                                let mut all = self.shared.topic_ids.lock().unwrap_or_else(|p| p.into_inner());
                                let ids = all.entry(dst).or_default();
                                for (id, name) in learned {
                                    if ids.len() < MAX_TOPIC_IDS || ids.contains_key(&id) {
                                        ids.insert(id, name);
                                    }
                                }
                            }
                        }
                        client.write_all(&frame).await?;
                    }
                }
            }
        }
    }
}

enum Judged {
    /// Send the frame to the broker; the entry says who answers (none for acks=0).
    Forward(Option<Pending>),
    /// Do not send it; the entry is our answer (none when the client expects no answer).
    Answer(Option<Pending>),
}
