//! Monitor events: what `fqdnwall monitor` streams, one JSON object per line.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// Events buffered per subscriber; a monitor that falls further behind is told how many it
/// missed rather than slowing the proxy down.
const BUFFER: usize = 4096;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub time: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub endpoint: Option<String>,
    pub direction: Option<&'static str>,
    pub src_ip: Option<String>,
    pub dst_ip: Option<String>,
    pub dport: Option<u16>,
    pub protocol: Option<&'static str>,
    pub src_identity: Option<u32>,
    pub dst_identity: Option<u32>,
    pub verdict: &'static str,
    /// Fields of the event's type (`query`, `qtype`, `rcode`, `ips`, `ttl` for `dns`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

pub struct Events {
    tx: broadcast::Sender<Arc<Event>>,
    /// Monitors listening. Kept beside the channel because the proxy asks for every query
    /// and the channel's own count takes its lock.
    subscribers: Arc<AtomicUsize>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

/// A monitor's receiver; counted while it lives.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    subscribers: Arc<AtomicUsize>,
}

impl Deref for Subscription {
    type Target = broadcast::Receiver<Arc<Event>>;

    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl DerefMut for Subscription {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(BUFFER).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Sends to every monitor; nothing is kept when no monitor listens.
    pub fn publish(&self, e: Event) {
        if self.has_subscribers() {
            let _ = self.tx.send(Arc::new(e));
        }
    }

    pub fn subscribe(&self) -> Subscription {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        Subscription {
            rx: self.tx.subscribe(),
            subscribers: self.subscribers.clone(),
        }
    }

    pub fn has_subscribers(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }
}
