//! fqdnwall's DNS proxy: the I/O crate between workloads and their DNS servers.
//!
//! It owns the UDP and TCP listeners, the pooled upstream client and the DNS message work
//! (hickory-proto parses; the proxy's own small answers are built by hand so the client's
//! question comes back byte for byte). It owns no policy and no state: for each query it asks
//! the agent's [`DnsPolicy`] whether the query may go; for each allowed, successful answer it
//! hands what the answer teaches ([`LearnedAnswer`]) to the agent's [`Learner`] and holds the
//! response until the learner's future says the datapath can enforce the IPs (bounded by
//! `responseMaxDelay`; see the ordering invariant on [`Learner`]).
//!
//! Data flows: client bytes → judgement (one question, opcode QUERY, parses whole; else
//! FORMERR / NOTIMP, or a counted drop) → original destination or upstream → policy →
//! forward (UDP: multiplexed by random ID over a few sockets; TCP: a connection per query) →
//! answer matched to its query (source, ID, question) → learning → hold → client (ID
//! restored), with every step counted in [`ProxyMetrics`].
//!
//! Threads: UDP is served by per-core shards, each with listening sockets from SO_REUSEPORT
//! groups and upstream sockets of its own, every socket with a thread that blocks receiving
//! on it, and a current-thread runtime for the answers the datapath keeps waiting; TCP on the
//! runtime that called [`DnsProxy::start`]. The receiving threads run at realtime priority
//! within a budget ([`ProxyConfig::realtime_priority`]).
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::sync::Arc;
//! use dnsproxy::{Decision, DnsPolicy, DnsProxy, HoldOutcome, LearnedAnswer, Learner,
//!                ProxyConfig, QueryContext, Transport};
//! use policy::fqdn::DnsName;
//!
//! struct Policy;
//! impl DnsPolicy for Policy {
//!     fn check(&self, _c: SocketAddr, _s: SocketAddr, _t: Transport, q: &DnsName) -> Decision {
//!         if q.as_str().ends_with(".example.com.") {
//!             Decision::Allow { endpoint_id: 1 }
//!         } else {
//!             Decision::Deny { endpoint_id: 1 }
//!         }
//!     }
//! }
//! struct Datapath;
//! impl Learner for Datapath {
//!     fn learn(&self, _ctx: &QueryContext, _answer: &LearnedAnswer)
//!         -> impl std::future::Future<Output = HoldOutcome> + Send + Unpin + 'static {
//!         // Apply policy-map then ipcache entries; resolve once both hold every IP.
//!         std::future::ready(HoldOutcome::Enforceable)
//!     }
//! }
//!
//! # async fn run() -> Result<(), dnsproxy::DnsProxyError> {
//! let config = ProxyConfig::new(
//!     vec!["127.0.0.1:5353".parse().unwrap()],
//!     vec!["127.0.0.1:53".parse().unwrap()],
//! );
//! let proxy = DnsProxy::start(config, Arc::new(Policy), Arc::new(Datapath), None).await?;
//! let metrics = proxy.metrics(); // export these
//! # drop(metrics);
//! // ... until shutdown:
//! proxy.shutdown();
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod hooks;
mod message;
mod metrics;
mod net;
mod priority;
mod replies;
mod server;
mod upstream;
mod wire;

pub use config::{ProxyConfig, RejectCode};
pub use error::DnsProxyError;
pub use hooks::{
    Decision, DnsPolicy, EndpointId, HoldOutcome, LearnedAnswer, Learner, OriginalDst,
    QueryContext, QueryEvent, Transport,
};
pub use metrics::{Counter, Histogram, HistogramSnapshot, ProxyMetrics, Verdict};
pub use server::DnsProxy;
