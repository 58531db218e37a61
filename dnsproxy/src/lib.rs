//! fqdnwall's DNS proxy: the I/O crate between workloads and their DNS servers.
//!
//! It owns the UDP and TCP listeners, the pooled upstream client and the DNS message work
//! (hickory-proto for parsing and building only). It owns no policy and no state: for each
//! query it asks the agent's [`DnsPolicy`] whether the query may go; for each allowed,
//! successful answer it hands what the answer teaches to the agent's [`Learner`] and holds the
//! response until the learner's future says the datapath can enforce the IPs (bounded by
//! `responseMaxDelay`). Data flows: client bytes → [`message`] judgement → policy → upstream →
//! answer matched to its query → learning → hold → client, with every step counted in
//! [`ProxyMetrics`].

mod config;
mod error;
mod hooks;
mod message;
mod metrics;

pub use config::{ProxyConfig, RejectCode};
pub use error::DnsProxyError;
pub use hooks::{
    Decision, DnsPolicy, EndpointId, HoldOutcome, LearnedAnswer, Learner, OriginalDst,
    QueryContext, QueryEvent, Transport,
};
pub use metrics::{Histogram, HistogramSnapshot, ProxyMetrics, Verdict};

mod net;
mod server;
mod upstream;

pub use server::DnsProxy;
