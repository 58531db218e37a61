//! Monitor events: what `fqdnwall monitor` streams, one JSON object per line.

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
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(BUFFER).0,
        }
    }

    /// Sends to every monitor; nothing is kept when no monitor listens.
    pub fn publish(&self, e: Event) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(e));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}
