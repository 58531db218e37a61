//! The traits through which the agent decides, learns and locates: the proxy owns sockets and
//! messages, the agent owns policy, the FQDN cache and the datapath.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use policy::fqdn::DnsName;

/// The endpoint id the agent assigns (unique on the node).
pub type EndpointId = u16;

/// The transport a query arrived on (and is forwarded on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The policy's answer for one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward the query; learn from its answer for this endpoint.
    Allow { endpoint_id: EndpointId },
    /// Answer with the configured reject code.
    Deny { endpoint_id: EndpointId },
    /// The source address belongs to no endpoint: answered like a denied query (the agent that
    /// wants to serve such clients maps them to an endpoint, e.g. the host, instead).
    UnknownEndpoint,
}

/// Decides whether a query may be forwarded. Called once per well-formed query, on the
/// proxy's hot path: it must not block (no I/O, no lock held for long).
pub trait DnsPolicy: Send + Sync + 'static {
    /// `client` is the query's source (it finds the endpoint), `server` the destination the query
    /// goes to (the original destination in transparent mode, else the chosen upstream; its
    /// identity, port and `transport` select the DNS rules), `qname` the question name in normal
    /// form (lower case, trailing dot).
    fn check(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        transport: Transport,
        qname: &DnsName,
    ) -> Decision;
}

/// Who asked what, handed to the [`Learner`] with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryContext {
    pub endpoint_id: EndpointId,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
    pub qname: DnsName,
    /// Numeric query type (1 = A, 28 = AAAA, 65 = HTTPS, ...).
    pub qtype: u16,
}

/// What an allowed, successful (NOERROR) response teaches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LearnedAnswer {
    /// The CNAME chain after the question name (the context's `qname`): every target, in
    /// order; empty for a direct answer. The cache files `ips` under the question name and
    /// each of these, so a toFQDNs selector on a CNAME target works.
    pub chain: Vec<DnsName>,
    /// A and AAAA addresses of the chain's names, then SVCB/HTTPS ipv4hint/ipv6hint addresses,
    /// without duplicates.
    pub ips: Vec<IpAddr>,
    /// The smallest TTL among the chain's CNAME records and the records that gave the IPs,
    /// raised to the configured `min_ttl`.
    pub ttl: u32,
}

/// How the datapath answered a [`Learner::learn`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Policy maps (first) and ipcache (second) hold entries for every IP of the answer.
    Enforceable,
    /// The datapath could not take the entries (e.g. a full map). The response is released
    /// anyway (connections to the IPs will be dropped, which is the safe side), counted and
    /// logged.
    Failed(String),
}

/// Receives what allowed answers teach and says when it is enforceable.
///
/// # Ordering invariant
///
/// The proxy calls `learn` once per response that carries IPs and releases that response to
/// the client only when the returned future resolves (or `responseMaxDelay` passes). The future
/// must resolve only once **every IP of this `answer`** is enforceable for this endpoint: the
/// policy maps updated first, then the ipcache. In particular, an IP that the cache already
/// knows because another request for the same name learned it a moment ago is *not* yet
/// enforceable while that other request's datapath update is still in flight: this request's
/// future waits for that update too, so no response is ever released early because a sibling
/// request got there first.
///
/// The future is `Unpin` so the proxy can look at it once, in place, before deciding to keep
/// it: most answers refresh IPs that are enforceable already, and the future of those should
/// be ready at once (e.g. `std::future::ready`) and cost nothing more. A future that must
/// wait can be boxed (`Box::pin(async move { ... })`).
pub trait Learner: Send + Sync + 'static {
    fn learn(
        &self,
        ctx: &QueryContext,
        answer: &LearnedAnswer,
    ) -> impl Future<Output = HoldOutcome> + Send + Unpin + 'static;

    /// Told about every query the proxy answered or dropped (for `monitor --type dns` and
    /// logs). Called after the response is sent; must not block.
    fn observe(&self, _event: &QueryEvent) {}

    /// Whether [`Learner::observe`] wants events now; when it says no, the proxy does not
    /// build them (a query's event costs a copy of its name). Must be cheap (an atomic
    /// load, no lock).
    fn observing(&self) -> bool {
        true
    }
}

/// One finished query, for observers.
#[derive(Debug, Clone)]
pub struct QueryEvent {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
    pub qname: DnsName,
    pub qtype: u16,
    pub decision: Decision,
    /// The rcode sent to the client; `None` when no reply was sent (upstream timeout).
    pub rcode: Option<u16>,
    pub learned: Option<LearnedAnswer>,
    /// Time from the upstream answer to its release (zero when nothing was held).
    pub hold: Duration,
}

/// Where a query was originally sent, for datapaths that redirect queries without the socket
/// seeing the original destination (e.g. cgroup connect/sendmsg hooks that rewrite it). With
/// `bpf_sk_assign` the socket itself sees it and no hook is needed (config `transparent`).
pub trait OriginalDst: Send + Sync + 'static {
    /// `received_on` is the destination the proxy's socket saw (IP_RECVORIGDSTADDR or
    /// getsockname on transparent sockets, else the listening address). `None`: not known here.
    fn original_dst(
        &self,
        client: SocketAddr,
        received_on: SocketAddr,
        transport: Transport,
    ) -> Option<SocketAddr>;
}
