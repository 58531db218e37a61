//! Sockets of the transparent proxies: listeners with `IP_TRANSPARENT`, the original
//! destination of a steered connection, and upstream connections carrying a mark.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Where a proxy sends what it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// The datapath steers flows to the listener (`bpf_sk_assign`); each connection goes on to
    /// its original destination (the accepted socket's local address). The listener is opened
    /// with `IP_TRANSPARENT` so it may own connections to addresses that are not local.
    /// `mark` is set (`SO_MARK`) on upstream connections so the datapath does not steer them
    /// back to the proxy.
    Transparent { mark: Option<u32> },
    /// Every connection goes to one upstream (a plain reverse proxy; tests and benches).
    Fixed {
        upstream: SocketAddr,
        mark: Option<u32>,
    },
}

impl ProxyMode {
    pub fn mark(&self) -> Option<u32> {
        match self {
            ProxyMode::Transparent { mark } | ProxyMode::Fixed { mark, .. } => *mark,
        }
    }

    pub fn is_transparent(&self) -> bool {
        matches!(self, ProxyMode::Transparent { .. })
    }
}

/// Opens a TCP listener; `transparent` sets `IP_TRANSPARENT` (needs CAP_NET_ADMIN).
/// `SO_REUSEPORT` is set so that several listeners (one per worker thread, each on its own
/// single-threaded runtime) can share the address and the kernel spreads connections over
/// them; only sockets of the same user may join the group.
pub fn bind_listener(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if transparent {
        if addr.is_ipv4() {
            sock.set_ip_transparent_v4(true)?;
        } else {
            sock.set_ip_transparent_v6(true)?;
        }
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// The destination the client connected to. For a connection steered by `bpf_sk_assign` (or
/// TPROXY) to a transparent listener, the kernel keeps the original address as the socket's
/// local address, so `getsockname` gives it.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    stream.local_addr()
}

/// Connects to `dst` with `SO_MARK` set before the SYN leaves, so the datapath recognizes
/// the proxy's own upstream traffic.
pub async fn connect_marked(dst: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    sock.set_nonblocking(true)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    let stream = sock.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Accepts connections until the task is dropped, finds each one's destination (the fixed
/// upstream, or the original destination of a steered connection) and hands it to `serve` on
/// its own task. `proxy` names the proxy in log lines.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mode: ProxyMode,
    proxy: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "{proxy} proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let dst = match mode {
            ProxyMode::Fixed { upstream, .. } => upstream,
            ProxyMode::Transparent { .. } => match original_dst(&stream) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "{proxy} proxy: no original destination");
                    continue;
                }
            },
        };
        tokio::spawn(serve(stream, src, dst));
    }
}
