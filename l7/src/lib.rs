//! L7 enforcement: HTTP/1.1, HTTP/2 (gRPC) and Kafka proxies that apply a policy's L7 rules
//! per request.
//!
//! What it owns and how data flows:
//! - [`http_rules`] and [`kafka_rules`] are pure matchers. The agent compiles the rules of one
//!   (endpoint, remote identity, port) once per policy revision ([`HttpPolicy::compile`],
//!   [`KafkaPolicy::compile`]) and hands them out through [`L7PolicySource`].
//! - [`kafka_codec`] parses Kafka request frames and builds denial responses (sans-I/O, on the
//!   `kafka-protocol` crate).
//! - [`http_proxy`] and [`kafka_proxy`] accept connections (transparently steered by the
//!   datapath, or on a fixed listener in front of a fixed upstream), ask the policy source for
//!   the rule set of *each request* (so a policy change applies to the next request of an open
//!   connection), forward what is allowed and answer what is denied themselves.
//! - [`events`] carries one [`L7Event`] per request (for `monitor --type l7`) and counters per
//!   protocol and verdict.

pub mod error;
pub mod events;
pub mod http_proxy;
pub mod http_rules;
pub mod kafka_codec;
pub mod kafka_proxy;
pub mod kafka_rules;
pub mod net;
pub mod policy;
pub mod secret;

pub use error::L7Error;
pub use events::{EventSink, L7Event, L7EventKind, L7Protocol, L7Stats, L7Verdict};
pub use http_proxy::{HttpProxy, HttpProxyConfig, HttpProxyService};
pub use http_rules::{HeaderAction, HttpDecision, HttpPolicy, HttpRequestView, RequestHeaders};
pub use kafka_proxy::{KafkaProxy, KafkaProxyConfig, KafkaProxyService};
pub use kafka_rules::{KafkaDecision, KafkaPolicy, KafkaRequestView};
pub use net::{ConnectionWorkers, ProxyMode};
pub use policy::{FlowKey, L7PolicySource, Redirect, SwappablePolicy};
pub use secret::{SecretDir, SecretError, SecretSource};
