//! Test bed for the kernel tests: network namespaces as endpoints and as the "world", a
//! router namespace where the programs are attached, servers and clients run in threads that
//! enter a namespace. Everything is removed by Drop guards, also when a test fails.
//!
//! Layout of one [`Bed`] (n = a per-test number):
//! ```text
//!  client ns c<i> (eth0 10.n.i.2, fd00:n:i::2) ── veth ── router ns (hc<i> 10.n.i.1)
//!  world ns       (eth0 10.n.200.2, fd00:n:c8::2) ── veth ── router ns (hw 10.n.200.1)
//! ```
//! The router forwards between them; the endpoint programs run on hc<i>.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ebpf::{BpfDatapath, EndpointFlags, EndpointSpec, LoadOptions};
use ipnet::IpNet;

/// Root and a kernel with BPF are needed. Without them the test is skipped, except under
/// CI=true where a missing prerequisite is a failure.
pub fn privileged() -> bool {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let bpffs = std::path::Path::new("/sys/fs/bpf").exists();
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && bpffs && ip {
        return true;
    }
    let why = format!("root={root} /sys/fs/bpf={bpffs} iproute2={ip}");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("kernel tests need root, bpffs and iproute2 ({why})");
    }
    eprintln!("skipping kernel test: {why}");
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique() -> u32 {
    // pid keeps parallel test binaries apart, the counter parallel tests of one binary.
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    (std::process::id() % 10_000) * 100 + n
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    pub fn sysctl(&self, kv: &str) {
        run("ip", &["netns", "exec", &self.name, "sysctl", "-qw", kv]);
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into a namespace.
pub fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a valid namespace fd; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// A pin directory of its own, removed (with everything pinned) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(n: u32) -> PinDir {
        let p = PathBuf::from(format!("/sys/fs/bpf/fqdnwall-test-{n}"));
        let _ = ebpf::remove_pins(&p);
        PinDir(p)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = ebpf::remove_pins(&self.0);
    }
}

pub struct Client {
    pub ns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub host_if: String,
    pub ifindex: u32,
}

/// The whole test bed. Field order is drop order: datapath, then namespaces, then pins.
pub struct Bed {
    pub dp: Option<BpfDatapath>,
    pub clients: Vec<Client>,
    pub world: Netns,
    pub world_v4: Ipv4Addr,
    pub world_v6: Ipv6Addr,
    pub router: Netns,
    pub pins: PinDir,
    pub n: u32,
}

impl Bed {
    /// A router, a world namespace and `clients` endpoint namespaces; the datapath is loaded
    /// with `opts` (its pin dir replaced by the bed's own).
    pub fn new(clients: usize, mut opts: LoadOptions) -> Bed {
        let id = unique();
        let n = id % 250 + 1;
        let router = Netns::new(format!("fwt{id}r"));
        router.sysctl("net.ipv4.ip_forward=1");
        router.sysctl("net.ipv6.conf.all.forwarding=1");
        let world = Netns::new(format!("fwt{id}w"));
        let world_v4 = Ipv4Addr::new(10, n as u8, 200, 2);
        let world_v6: Ipv6Addr = format!("fd00:{n:x}:c8::2").parse().unwrap();
        router.ip(&[
            "link",
            "add",
            "hw",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &world.name,
        ]);
        router.ip(&["addr", "add", &format!("10.{n}.200.1/24"), "dev", "hw"]);
        router.ip(&[
            "addr",
            "add",
            &format!("fd00:{n:x}:c8::1/64"),
            "dev",
            "hw",
            "nodad",
        ]);
        router.ip(&["link", "set", "hw", "up"]);
        world.ip(&["addr", "add", &format!("{world_v4}/24"), "dev", "eth0"]);
        world.ip(&[
            "addr",
            "add",
            &format!("{world_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        world.ip(&["link", "set", "eth0", "up"]);
        world.ip(&["route", "add", "default", "via", &format!("10.{n}.200.1")]);
        world.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:{n:x}:c8::1"),
        ]);
        let mut cl = Vec::new();
        for i in 1..=clients {
            let ns = Netns::new(format!("fwt{id}c{i}"));
            let host_if = format!("hc{i}");
            router.ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            router.ip(&["addr", "add", &format!("10.{n}.{i}.1/24"), "dev", &host_if]);
            router.ip(&[
                "addr",
                "add",
                &format!("fd00:{n:x}:{i:x}::1/64"),
                "dev",
                &host_if,
                "nodad",
            ]);
            router.ip(&["link", "set", &host_if, "up"]);
            let v4 = Ipv4Addr::new(10, n as u8, i as u8, 2);
            let v6: Ipv6Addr = format!("fd00:{n:x}:{i:x}::2").parse().unwrap();
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", &format!("10.{n}.{i}.1")]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{n:x}:{i:x}::1"),
            ]);
            let hi = host_if.clone();
            let ifindex = router.run(move || ebpf::ifindex(&hi).unwrap());
            cl.push(Client {
                ns,
                v4,
                v6,
                host_if,
                ifindex,
            });
        }
        let pins = PinDir::new(id);
        opts.pin_dir = pins.0.clone();
        let dp = BpfDatapath::load_or_adopt(&opts).expect("load datapath");
        Bed {
            dp: Some(dp),
            clients: cl,
            world,
            world_v4,
            world_v6,
            router,
            pins,
            n,
        }
    }

    pub fn dp(&self) -> &BpfDatapath {
        self.dp.as_ref().expect("datapath loaded")
    }

    /// Attaches client `i` (1-based) as endpoint `ep` with `identity`. Runs in the router.
    pub fn attach(&self, i: usize, ep: u16, identity: u32, flags: EndpointFlags) {
        let c = &self.clients[i - 1];
        let dp: &'static BpfDatapath = unsafe_static(self.dp());
        let ifindex = c.ifindex;
        self.router.run(move || {
            dp.attach(
                ifindex,
                ebpf::AttachKind::Endpoint,
                EndpointSpec {
                    id: ep,
                    identity,
                    flags,
                },
            )
            .expect("attach")
        });
    }

    pub fn client(&self, i: usize) -> &Client {
        &self.clients[i - 1]
    }

    pub fn world_net4(&self) -> IpNet {
        format!("10.{}.200.0/24", self.n).parse().unwrap()
    }
}

/// The namespace thread is joined before the borrow ends; the datapath outlives it.
pub fn unsafe_static(dp: &BpfDatapath) -> &'static BpfDatapath {
    // SAFETY: callers join the thread that uses the reference before returning.
    unsafe { &*(dp as *const BpfDatapath) }
}

pub const ENFORCE: EndpointFlags = EndpointFlags {
    audit: false,
    enforce_ingress: true,
    enforce_egress: true,
};

/// A TCP server answering each connection with what it reads, prefixed by "echo:".
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// TCP and UDP echo servers on `port` for both families in namespace `ns`.
    pub fn start(ns: &Netns, ports: &[u16]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            // [::] without V6ONLY serves IPv4 too (mapped addresses).
            let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            let (tx, rx) = std::sync::mpsc::channel();
            let st = stop.clone();
            threads.push(ns.spawn(move || {
                let l = TcpListener::bind(SocketAddr::new(any, port)).expect("bind tcp");
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !st.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            std::thread::spawn(move || {
                                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                                let mut buf = [0u8; 512];
                                while let Ok(n) = s.read(&mut buf) {
                                    if n == 0 {
                                        break;
                                    }
                                    let mut out = b"echo:".to_vec();
                                    out.extend_from_slice(&buf[..n]);
                                    if s.write_all(&out).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            rx.recv().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let st = stop.clone();
            threads.push(ns.spawn(move || {
                let u = UdpSocket::bind(SocketAddr::new(any, port)).expect("bind udp");
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                tx.send(()).unwrap();
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        let mut out = b"echo:".to_vec();
                        out.extend_from_slice(&buf[..n]);
                        let _ = u.send_to(&out, from);
                    }
                }
            }));
            rx.recv().unwrap();
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP exchange from namespace `ns` within `timeout` (no SYN retransmission fits in
/// less than one second). Ok(reply) or Err(why).
pub fn tcp(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<String, String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.write_all(b"hi").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        let _ = s.shutdown(Shutdown::Both);
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// An open TCP connection living in a namespace thread: send a line, get the echo.
pub struct OpenConn {
    tx: std::sync::mpsc::Sender<Option<Vec<u8>>>,
    rx: std::sync::mpsc::Receiver<Result<String, String>>,
    t: Option<JoinHandle<()>>,
}

impl OpenConn {
    pub fn open(ns: &Netns, to: SocketAddr) -> Result<OpenConn, String> {
        let (tx, crx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
        let (ctx, rx) = std::sync::mpsc::channel();
        let t = ns.spawn(move || {
            let mut s = match TcpStream::connect_timeout(&to, Duration::from_millis(900)) {
                Ok(s) => {
                    ctx.send(Ok(String::new())).unwrap();
                    s
                }
                Err(e) => {
                    ctx.send(Err(e.to_string())).unwrap();
                    return;
                }
            };
            s.set_read_timeout(Some(Duration::from_millis(900)))
                .unwrap();
            while let Ok(Some(msg)) = crx.recv() {
                let r = s.write_all(&msg).map_err(|e| e.to_string()).and_then(|_| {
                    let mut buf = [0u8; 64];
                    s.read(&mut buf)
                        .map_err(|e| e.to_string())
                        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                });
                ctx.send(r).unwrap();
            }
        });
        rx.recv().unwrap()?;
        Ok(OpenConn { tx, rx, t: Some(t) })
    }

    pub fn exchange(&self, msg: &str) -> Result<String, String> {
        self.tx.send(Some(msg.as_bytes().to_vec())).unwrap();
        self.rx.recv().unwrap()
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        let _ = self.tx.send(None);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// One UDP request of `size` bytes; Ok(length of the reply).
pub fn udp_big(
    ns: &Netns,
    to: SocketAddr,
    size: usize,
    timeout: Duration,
) -> Result<usize, String> {
    ns.run(move || {
        let u = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
            .map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(timeout)).unwrap();
        u.send_to(&vec![b'x'; size], to)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = u.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(n)
    })
}

/// One UDP request/response.
pub fn udp(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<String, String> {
    ns.run(move || {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let u = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(timeout)).unwrap();
        u.send_to(b"hi", to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let (n, _) = u.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

fn icmp_csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// One ICMP echo (ping) from `ns`; true when the reply came within `timeout`.
pub fn ping(ns: &Netns, to: IpAddr, timeout: Duration) -> bool {
    ns.run(move || {
        let (domain, proto, ty) = match to {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
        };
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, proto) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sock = socket2::Socket::from(unsafe_fd(fd));
        // A new identifier per ping: a new flow for conntrack.
        static PING_ID: AtomicU32 = AtomicU32::new(0);
        let id: u16 =
            (std::process::id() as u16) ^ (PING_ID.fetch_add(1, Ordering::Relaxed) as u16);
        let mut pkt = vec![ty, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&1u16.to_be_bytes());
        pkt.extend_from_slice(b"fqdnwall");
        if to.is_ipv4() {
            let c = icmp_csum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        }
        let dst = socket2::SockAddr::from(SocketAddr::new(to, 0));
        sock.send_to(&pkt, &dst).expect("send echo");
        let deadline = Instant::now() + timeout;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while Instant::now() < deadline {
            sock.set_read_timeout(Some(deadline - Instant::now() + Duration::from_millis(1)))
                .unwrap();
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return false;
            };
            // SAFETY: recv_from initialised the first n bytes.
            let data: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            if from.as_socket().map(|s| s.ip()) != Some(to) {
                continue;
            }
            // IPv4 raw sockets include the IP header.
            let icmp = if to.is_ipv4() {
                let ihl = usize::from(data[0] & 0x0f) * 4;
                &data[ihl..]
            } else {
                &data[..]
            };
            let reply = if to.is_ipv4() { 0 } else { 129 };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
                return true;
            }
        }
        false
    })
}

fn unsafe_fd(fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: a freshly created descriptor we own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub const SHORT: Duration = Duration::from_millis(900);
