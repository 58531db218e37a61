//! Sockets of the transparent proxies: listeners with `IP_TRANSPARENT`, the original
//! destination of a steered connection, upstream connections carrying a mark, and the
//! worker threads that serve accepted connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// The CPUs this process may run on (its affinity mask); `None` if it cannot be read.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; the call gets a valid pointer and its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: as in `allowed_cpus`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Threads that serve proxied connections, each running its own single-threaded Tokio
/// runtime; an accepted connection goes to the one serving the fewest connections.
///
/// Why not the multi-thread runtime: a proxied request is a few short steps (read, judge,
/// write upstream, read, write back), so on a multi-thread runtime much of its cost goes to
/// waking idle workers to steal work and parking them again. Why not one listener per thread
/// (`SO_REUSEPORT`): the kernel spreads connections by a hash of their addresses, unevenly
/// for a few dozen connections (one thread gets 20 of 32 and its clients wait), and a listener
/// the datapath steers flows to (`bpf_sk_assign`) is one socket. Here one accept loop hands
/// each connection to the least busy thread, and a connection stays on that thread.
pub struct ConnectionWorkers {
    workers: Vec<Worker>,
    /// Where the search for the least busy worker starts (rotates, so ties spread evenly).
    next: AtomicUsize,
    /// Dropped with the workers: their threads stop (and their connections close).
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    /// Connections being served.
    active: Arc<AtomicUsize>,
}

impl ConnectionWorkers {
    /// Starts `threads` worker threads (at least one) named `{name}-{i}`, unpinned.
    pub fn start(threads: usize, name: &str) -> io::Result<ConnectionWorkers> {
        Self::spawn_workers(threads.max(1), name, None)
    }

    /// `threads` workers; with `cpus`, worker `i` runs only on `cpus[i % cpus.len()]`.
    fn spawn_workers(
        threads: usize,
        name: &str,
        cpus: Option<&[usize]>,
    ) -> io::Result<ConnectionWorkers> {
        let mut workers = Vec::new();
        let mut stop = Vec::new();
        for i in 0..threads {
            let cpu = cpus.map(|c| c[i % c.len()]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = pin_to(cpu) {
                            tracing::debug!(cpu, error = %e, "proxy worker left unpinned");
                        }
                    }
                    rt.block_on(async move {
                        let _ = rx.await;
                    });
                })?;
            workers.push(Worker {
                handle,
                active: Arc::new(AtomicUsize::new(0)),
            });
            stop.push(tx);
        }
        Ok(ConnectionWorkers {
            workers,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// The workers for a proxy that shares its machine with the workloads it serves: one
    /// per two CPUs this process may use (at least one), each pinned to its own CPU (every
    /// other one) when there are several.
    ///
    /// Why not one per CPU: a worker wakes once for whatever its connections have ready, so
    /// the fewer workers the connections are spread over, the more each wake-up carries, and
    /// wake-ups are most of what the kernel spends on a proxied request. On two cores shared
    /// with the load generator and the backend (bench/RESULTS.md, medians of five interleaved
    /// rounds), one worker against two pinned ones measured HTTP/2 (h2load -c16 -m16) 1.04×
    /// against 0.82× of direct's requests per second, and HTTP/1.1 (wrk -c32) 1.10× against
    /// 1.06× nginx's requests per second with p99 0.63× against 0.47× nginx's. Why pinned
    /// when there are several: a worker serves every connection it was given, so when two
    /// workers share a core all of one worker's connections wait, which is what the p99 of a
    /// loaded proxy is made of (two unpinned workers measured p99 0.76–2.69× nginx's, pinned
    /// 0.37–0.92×).
    pub fn for_node(name: &str) -> io::Result<ConnectionWorkers> {
        let cpus = allowed_cpus().filter(|c| !c.is_empty());
        let count = cpus.as_ref().map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            Vec::len,
        );
        let threads = (count / 2).max(1);
        match cpus {
            Some(cpus) if threads > 1 => {
                let every_other: Vec<usize> = cpus.iter().step_by(2).copied().collect();
                Self::spawn_workers(threads, name, Some(&every_other))
            }
            _ => Self::start(threads, name),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Connections each worker serves right now.
    pub fn load(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.active.load(Ordering::Relaxed))
            .collect()
    }

    /// Serves `stream` on the least busy worker: `serve(stream)` runs there, with the stream
    /// registered with that worker's runtime. Callable from any thread.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F) -> io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let w = (0..n)
            .map(|k| &self.workers[(start + k) % n])
            .min_by_key(|w| w.active.load(Ordering::Relaxed))
            .unwrap_or(&self.workers[0]);
        // Out of the accepting runtime's reactor, into the worker's (non-blocking stays set).
        let stream = stream.into_std()?;
        let active = w.active.clone();
        active.fetch_add(1, Ordering::Relaxed);
        let done = Served(active);
        w.handle.spawn(async move {
            let _done = done;
            match TcpStream::from_std(stream) {
                Ok(s) => serve(s).await,
                Err(e) => tracing::warn!(error = %e, "proxy worker: cannot take the connection"),
            }
        });
        Ok(())
    }
}

/// Counts a connection as served when dropped (also when its task is cancelled).
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until the task is dropped, finds each one's destination (the fixed
/// upstream, or the original destination of a steered connection) and hands it to `serve` on
/// its own task (on `workers` when given, else on the current runtime). `proxy` names the
/// proxy in log lines.
pub(crate) async fn accept_loop_on<F, Fut>(
    listener: TcpListener,
    mode: ProxyMode,
    proxy: &'static str,
    workers: Option<Arc<ConnectionWorkers>>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut + Clone + Send + 'static,
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
        match &workers {
            Some(w) => {
                let serve = serve.clone();
                if let Err(e) = w.spawn(stream, move |s| serve(s, src, dst)) {
                    tracing::warn!(error = %e, "{proxy} proxy: cannot hand the connection to a worker");
                }
            }
            None => {
                tokio::spawn(serve(stream, src, dst));
            }
        }
    }
}

/// [`accept_loop_on`] the current runtime.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mode: ProxyMode,
    proxy: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop_on(listener, mode, proxy, None, serve).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `for_node`: one worker per two CPUs the process may use (at least one); a lone worker
    /// may run on every one of them, several are pinned each to its own CPU, every other one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_workers_are_half_the_cpus_pinned_when_several() {
        let allowed = allowed_cpus().expect("affinity readable");
        let workers = ConnectionWorkers::for_node("test-node").unwrap();
        let threads = (allowed.len() / 2).max(1);
        assert_eq!(workers.threads(), threads);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..threads {
            let client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            workers
                .spawn(server, |mut s| async move {
                    // Reports the CPUs this worker may run on.
                    let cpus = allowed_cpus().unwrap();
                    let text = format!("{cpus:?}");
                    let _ = s.write_all(text.as_bytes()).await;
                })
                .unwrap();
            clients.push(client);
        }
        let mut seen = Vec::new();
        for c in &mut clients {
            let mut text = String::new();
            c.read_to_string(&mut text).await.unwrap();
            seen.push(text);
        }
        seen.sort();
        let mut expected: Vec<String> = if threads == 1 {
            vec![format!("{allowed:?}")]
        } else {
            allowed
                .iter()
                .step_by(2)
                .take(threads)
                .map(|c| format!("[{c}]"))
                .collect()
        };
        expected.sort();
        assert_eq!(seen, expected, "which CPUs each worker may run on");
    }

    /// Connections spread evenly over the workers, are served there (with the stream usable on
    /// the worker's runtime), and leave the load count when they end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_serve_connections_spread_by_load() {
        let workers = ConnectionWorkers::start(2, "test-worker").unwrap();
        assert_eq!(workers.threads(), 2);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            workers
                .spawn(server, |mut s| async move {
                    // Echo, prefixed with the serving thread's name.
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    let mut buf = [0u8; 16];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                })
                .unwrap();
            clients.push(client);
        }
        assert_eq!(workers.load(), [2, 2]);
        let mut threads = Vec::new();
        for c in &mut clients {
            c.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).await.unwrap();
            let reply = String::from_utf8_lossy(&buf[..n]).to_string();
            let (thread, echoed) = reply.split_once(':').unwrap();
            assert_eq!(echoed, "ping");
            assert!(thread.starts_with("test-worker-"), "{thread}");
            threads.push(thread.to_string());
        }
        threads.sort();
        threads.dedup();
        assert_eq!(threads.len(), 2, "both workers serve");
        drop(clients);
        for _ in 0..100 {
            if workers.load() == [0, 0] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("load after the clients left: {:?}", workers.load());
    }
}
