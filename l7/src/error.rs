//! The crate's error type.

use std::net::SocketAddr;

/// Errors of rule compilation and of setting up proxies. Per-request problems are not errors:
/// they become verdicts, events and counters.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    /// An HTTP rule field did not compile as a regular expression (the policy parser checks
    /// this too; a rule set built by hand may still carry one).
    #[error("http rule {rule}: field `{field}`: invalid regular expression: {source}")]
    Regex {
        rule: usize,
        field: &'static str,
        #[source]
        source: regex::Error,
    },
    /// The patterns of one field of all HTTP rules, each valid, are too large together.
    #[error("http rules: field `{field}`: the patterns together do not compile: {reason}")]
    RegexSet { field: &'static str, reason: String },
    /// A header name in an HTTP rule is not a valid HTTP header name.
    #[error("http rule {rule}: field `{field}`: invalid header name {name:?}")]
    HeaderName {
        rule: usize,
        field: &'static str,
        name: String,
    },
    /// A header value in an HTTP rule cannot be sent as an HTTP header value.
    #[error("http rule {rule}: field `{field}`: invalid header value for {name:?}")]
    HeaderValue {
        rule: usize,
        field: &'static str,
        name: String,
    },
    /// A Kafka rule names an API key the protocol does not know.
    #[error("kafka rule {rule}: unknown api key {key}")]
    KafkaApiKey { rule: usize, key: i16 },
    #[error("binding proxy listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
