//! L7 events (one per request, for `monitor --type l7`) and counters per protocol and verdict.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L7Protocol {
    /// HTTP/1.1 and HTTP/2 (gRPC included).
    Http,
    Kafka,
}

impl L7Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            L7Protocol::Http => "http",
            L7Protocol::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L7Verdict {
    Allowed,
    Denied,
}

impl L7Verdict {
    /// The spelling of the monitor's `verdict` field.
    pub fn as_str(self) -> &'static str {
        match self {
            L7Verdict::Allowed => "allowed",
            L7Verdict::Denied => "denied",
        }
    }
}

/// The protocol-specific part of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum L7EventKind {
    Http {
        /// `HTTP/1.1` or `HTTP/2`.
        version: &'static str,
        method: String,
        /// Path and query as sent.
        path: String,
        host: String,
        /// Status sent to the client (the upstream's, 403 for a denial, 200 for a denied gRPC
        /// call, 502 when the upstream could not be reached).
        status: u16,
        /// `grpc-status` of a denied gRPC call.
        grpc_status: Option<u16>,
        /// Header changes made by `headerMatches` mismatch actions (`LOG x-a`, `REPLACE auth`).
        header_actions: Vec<String>,
    },
    Kafka {
        api_key: i16,
        /// The API key's name (`Produce`, `Fetch`, ...), or `unknown`.
        api_key_name: &'static str,
        api_version: i16,
        correlation_id: i32,
        client_id: Option<String>,
        topics: Vec<String>,
        /// Error code of the response we made for a denied request.
        error_code: Option<i16>,
    },
}

/// One request and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct L7Event {
    pub time: SystemTime,
    pub protocol: L7Protocol,
    pub src: SocketAddr,
    /// The original destination (or the fixed upstream).
    pub dst: SocketAddr,
    pub endpoint_id: Option<u16>,
    pub endpoint: Option<Arc<str>>,
    pub remote_identity: Option<u32>,
    pub verdict: L7Verdict,
    pub kind: L7EventKind,
}

/// Counters of one protocol.
#[derive(Debug, Default)]
pub struct ProtocolStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Requests that could not be parsed (HTTP 400, Kafka connection closed).
    pub malformed: AtomicU64,
    /// Allowed requests whose upstream could not be reached or failed.
    pub upstream_errors: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

/// A plain copy of [`ProtocolStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtocolCounts {
    pub allowed: u64,
    pub denied: u64,
    pub malformed: u64,
    pub upstream_errors: u64,
    pub connections: u64,
}

impl ProtocolStats {
    pub fn snapshot(&self) -> ProtocolCounts {
        ProtocolCounts {
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            upstream_errors: self.upstream_errors.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn verdict(&self, v: L7Verdict) {
        match v {
            L7Verdict::Allowed => &self.allowed,
            L7Verdict::Denied => &self.denied,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters for all protocols; shared by the proxies and read by the agent's metrics.
#[derive(Debug, Default)]
pub struct L7Stats {
    pub http: ProtocolStats,
    pub kafka: ProtocolStats,
}

impl L7Stats {
    pub fn protocol(&self, p: L7Protocol) -> &ProtocolStats {
        match p {
            L7Protocol::Http => &self.http,
            L7Protocol::Kafka => &self.kafka,
        }
    }
}

/// Where events go: a broadcast channel (many `monitor` clients may listen; a slow one loses
/// events rather than slowing the proxy) plus the counters.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: broadcast::Sender<L7Event>,
    stats: Arc<L7Stats>,
}

impl EventSink {
    /// `capacity`: events a slow subscriber may lag behind before it loses some.
    pub fn new(capacity: usize) -> EventSink {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventSink {
            tx,
            stats: Arc::new(L7Stats::default()),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<L7Event> {
        self.tx.subscribe()
    }

    pub fn stats(&self) -> &Arc<L7Stats> {
        &self.stats
    }

    /// Whether any subscriber listens, so a proxy may skip building an event nobody would
    /// receive (it still counts the verdict).
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Counts the verdict and publishes the event.
    pub(crate) fn emit(&self, ev: L7Event) {
        self.stats.protocol(ev.protocol).verdict(ev.verdict);
        if self.tx.receiver_count() > 0 {
            // No receiver is not an error: nobody is watching.
            let _ = self.tx.send(ev);
        }
    }
}
