//! How a proxy learns which rules apply to a request: the agent implements [`L7PolicySource`].
//!
//! The proxies ask for every request, not once per connection, so that a new policy revision
//! applies to the next request of an open connection. Implementations answer from an
//! immutable snapshot swapped atomically per revision (as [`SwappablePolicy`] does), so a
//! lookup is a few loads and never waits on the agent.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::http_rules::HttpPolicy;
use crate::kafka_rules::KafkaPolicy;

/// The flow a request travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client (its IP finds the endpoint).
    pub src: SocketAddr,
    /// The original destination (its IP finds the remote identity, its port the rules).
    pub dst: SocketAddr,
}

/// The rules for one flow and who it is between (for events).
#[derive(Debug)]
pub struct Redirect<P> {
    pub endpoint_id: u16,
    pub endpoint: Arc<str>,
    pub remote_identity: u32,
    pub policy: Arc<P>,
}

impl<P> Clone for Redirect<P> {
    fn clone(&self) -> Self {
        Redirect {
            endpoint_id: self.endpoint_id,
            endpoint: self.endpoint.clone(),
            remote_identity: self.remote_identity,
            policy: self.policy.clone(),
        }
    }
}

/// Implemented by the agent over its policy engine: (endpoint from `src`, remote identity from
/// `dst`, port) → compiled rules. `None` means no L7 policy covers the flow (it should not have
/// been redirected): the proxy then denies the request, failing closed. A flow whose L7
/// restriction is lifted (an L4-only allow on the same port and peer) gets a policy that
/// allows all ([`HttpPolicy::allow_all`], [`KafkaPolicy::allow_all`]).
pub trait L7PolicySource: Send + Sync + 'static {
    fn http(&self, flow: &FlowKey) -> Option<Redirect<HttpPolicy>>;
    fn kafka(&self, flow: &FlowKey) -> Option<Redirect<KafkaPolicy>>;
}

/// One rule set for every flow, replaceable at any time: the non-transparent mode (a proxy in
/// front of one upstream) and tests use it.
#[derive(Debug)]
pub struct SwappablePolicy {
    http: ArcSwap<Option<Redirect<HttpPolicy>>>,
    kafka: ArcSwap<Option<Redirect<KafkaPolicy>>>,
}

impl Default for SwappablePolicy {
    fn default() -> Self {
        SwappablePolicy {
            http: ArcSwap::from_pointee(None),
            kafka: ArcSwap::from_pointee(None),
        }
    }
}

impl SwappablePolicy {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_http(&self, r: Option<Redirect<HttpPolicy>>) {
        self.http.store(Arc::new(r));
    }

    pub fn set_kafka(&self, r: Option<Redirect<KafkaPolicy>>) {
        self.kafka.store(Arc::new(r));
    }
}

impl L7PolicySource for SwappablePolicy {
    fn http(&self, _flow: &FlowKey) -> Option<Redirect<HttpPolicy>> {
        (**self.http.load()).clone()
    }

    fn kafka(&self, _flow: &FlowKey) -> Option<Redirect<KafkaPolicy>> {
        (**self.kafka.load()).clone()
    }
}
