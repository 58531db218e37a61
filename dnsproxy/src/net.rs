//! Socket plumbing the standard library and tokio do not offer: SO_REUSEPORT groups,
//! IP_TRANSPARENT, reading datagrams in batches (recvmmsg) with their original destinations
//! (IP_RECVORIGDSTADDR) and reading ICMP errors of unconnected UDP sockets (IP_RECVERR +
//! MSG_ERRQUEUE). Linux only, like the product.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, name, &value)
}

/// setsockopt with `value` as the option's bytes.
fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receive buffer of the proxy's UDP sockets. The default (net.core.rmem_default, ~208 KiB)
/// holds only a few hundred small datagrams because each is charged its full skb size: one
/// scheduling hiccup at tens of thousands of queries per second would overflow it.
const UDP_RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// SO_RCVBUFFORCE (privileged: passes net.core.rmem_max), else SO_RCVBUF as far as the limit
/// allows. Best effort: a small buffer only costs drops under bursts.
fn grow_receive_buffer(s: &Socket) {
    if setsockopt_int(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        UDP_RECEIVE_BUFFER,
    )
    .is_err()
    {
        s.set_recv_buffer_size(UDP_RECEIVE_BUFFER as usize).ok();
    }
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn set_transparent(s: &Socket, addr: &SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)
    } else {
        s.set_ip_transparent_v6(true)
    }
}

/// A listening UDP socket of a SO_REUSEPORT group. With `transparent`, it also gets
/// IP_TRANSPARENT (needs CAP_NET_ADMIN) and reports each datagram's original destination.
pub(crate) fn udp_listener(addr: SocketAddr, transparent: bool) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(domain_of(&addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    grow_receive_buffer(&s); // bursts of queries queue here
    if transparent {
        set_transparent(&s, &addr)?;
    }
    // Cheap and always on: even without transparency it tells which local address a datagram
    // to a wildcard listener was sent to, so the answer leaves from that address.
    if addr.is_ipv4() {
        setsockopt_int(s.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)?;
    } else {
        setsockopt_int(s.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?;
    }
    // Blocking: a thread of its own waits in recvmmsg (see RecvBatch::recv). Sends that
    // find the buffer full wait at most SEND_WAIT.
    s.set_write_timeout(Some(SEND_WAIT))?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// The longest a send on a blocking UDP socket of the proxy waits for room in its buffer
/// (SO_SNDTIMEO); past it the datagram is given up, as a network would drop it.
pub(crate) const SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Wakes every thread blocked receiving on `s` and makes its later receives return at once
/// (`shutdown(SHUT_RD)`; on an unconnected UDP socket the call reports ENOTCONN but still
/// takes effect, which is what the kernel documents as a way to wake pollers). The receivers
/// read a stop flag set before calling this.
pub(crate) fn wake_receivers(s: &std::net::UdpSocket) {
    // SAFETY: a plain syscall on a descriptor `s` owns.
    unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RD) };
}

/// SO_ATTACH_REUSEPORT_CBPF from asm-generic/socket.h (the libc crate defines it only for
/// Android); the same value on every architecture the product builds for.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Steers each datagram of a SO_REUSEPORT group to socket `cpu mod group` (sockets are
/// numbered in the order they were bound): the CPU that received the datagram, for loopback
/// and most NICs the sender's. The kernel's default, a hash of the 4-tuple, leaves a few busy
/// clients all on one socket (four dnsperf clients on two sockets: one of them gets three or
/// all four half the time); by CPU, the shards share the load as the CPUs do and a query is
/// handled on the CPU that already holds its packet. Needs only `s` from the group.
pub(crate) fn steer_by_cpu(s: &std::net::UdpSocket, group: u32) -> io::Result<()> {
    let mut prog = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: group.max(1),
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // fprog points at `prog`, which outlives the call.
    setsockopt(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        SO_ATTACH_REUSEPORT_CBPF,
        &fprog,
    )
}

/// A listening TCP socket (SO_REUSEADDR so restarts do not wait for TIME_WAIT; IP_TRANSPARENT
/// when asked, then getsockname of an accepted connection is its original destination).
pub(crate) fn tcp_listener(
    addr: SocketAddr,
    transparent: bool,
) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(domain_of(&addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    if transparent {
        set_transparent(&s, &addr)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// An unconnected UDP socket of the upstream client on a random port of the wildcard address,
/// with IP_RECVERR so ICMP errors for any destination are reported, and the mark if any.
pub(crate) fn udp_upstream(ipv6: bool, mark: Option<u32>) -> io::Result<std::net::UdpSocket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    grow_receive_buffer(&s); // bursts of answers queue here
    if ipv6 {
        s.set_only_v6(true)?;
        setsockopt_int(s.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_RECVERR, 1)?;
        s.bind(&"[::]:0".parse::<SocketAddr>().expect("literal").into())?;
    } else {
        setsockopt_int(s.as_raw_fd(), libc::SOL_IP, libc::IP_RECVERR, 1)?;
        s.bind(&"0.0.0.0:0".parse::<SocketAddr>().expect("literal").into())?;
    }
    // Blocking, as the listeners: a thread of its own waits for answers.
    s.set_write_timeout(Some(SEND_WAIT))?;
    Ok(s.into())
}

/// A TCP socket to an upstream, marked if asked; not yet connected.
pub(crate) fn tcp_upstream(
    server: SocketAddr,
    mark: Option<u32>,
) -> io::Result<tokio::net::TcpSocket> {
    let s = Socket::new(domain_of(&server), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
}

/// A socket that sends one answer from `from` (a foreign address the client thinks it is
/// talking to) in transparent mode.
pub(crate) fn udp_reply_from(from: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(domain_of(&from), Type::DGRAM, Some(Protocol::UDP))?;
    if from.is_ipv6() {
        s.set_only_v6(true)?;
    }
    set_transparent(&s, &from)?;
    // The listener (or another answer in flight) may hold the same address and port.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&from.into())?;
    Ok(s.into())
}

fn storage_to_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = (len as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: `storage` is valid for reads of its size, `len` is at most that.
    unsafe { raw_to_addr((storage as *const libc::sockaddr_storage).cast(), len) }
}

/// The IPv4 or IPv6 socket address in the `len` bytes at `raw` (a sockaddr the kernel wrote,
/// not necessarily aligned); `None` for another family or too few bytes. Read field by field
/// in place: this runs for every datagram received (source, original destination), where
/// going through a copied `sockaddr_storage` cost more than the rest of the receive.
///
/// # Safety
/// `raw` must be valid for reads of `len` bytes.
unsafe fn raw_to_addr(raw: *const u8, len: usize) -> Option<SocketAddr> {
    if len < size_of::<libc::sa_family_t>() {
        return None;
    }
    let family = std::ptr::read_unaligned(raw.cast::<libc::sa_family_t>());
    match libc::c_int::from(family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            let a = std::ptr::read_unaligned(raw.cast::<libc::sockaddr_in>());
            Some(SocketAddr::V4(std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            let a = std::ptr::read_unaligned(raw.cast::<libc::sockaddr_in6>());
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message of a received datagram, if any.
fn original_dst(msg: &libc::msghdr) -> Option<SocketAddr> {
    let mut dst = None;
    // SAFETY: walking the control buffer the kernel filled (msg_control/msg_controllen as
    // recvmsg left them), with the libc macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let h = &*cmsg;
            let is_v4 = h.cmsg_level == libc::SOL_IP && h.cmsg_type == libc::IP_ORIGDSTADDR;
            let is_v6 = h.cmsg_level == libc::SOL_IPV6 && h.cmsg_type == libc::IPV6_ORIGDSTADDR;
            if is_v4 || is_v6 {
                let data = libc::CMSG_DATA(cmsg);
                let len = h.cmsg_len as usize - (data as usize - cmsg as usize);
                dst = raw_to_addr(data, len);
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    dst
}

/// Most datagrams one [`RecvBatch::recv`] reads.
pub(crate) const BATCH_MAX: usize = 32;

/// Buffers for reading up to [`BATCH_MAX`] datagrams with one recvmmsg call, each with its
/// source, its original destination (on IP_RECVORIGDSTADDR sockets) and whether it was cut.
/// The buffers are allocated zeroed and untouched, so memory is used only as far as the
/// kernel writes datagrams into it.
///
/// The recvmmsg headers are built once, pointing into the batch's own heap buffers (which do
/// not move when the batch does); a call only restores the lengths the previous call's
/// datagrams changed. At the rates the proxy sees most calls read one or two datagrams, and
/// rebuilding 32 headers each time was a visible share of its work.
pub(crate) struct RecvBatch {
    size: usize,
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 16]>,
    iovs: Box<[libc::iovec; BATCH_MAX]>,
    hdrs: Box<[libc::mmsghdr; BATCH_MAX]>,
    /// How many headers the last call may have changed (the kernel writes lengths and flags).
    used: usize,
    /// Per datagram of the last call: length, msg_flags, source length.
    lens: [(usize, libc::c_int, libc::socklen_t); BATCH_MAX],
    /// The destinations of the last call, read from the control messages.
    dsts: [Option<SocketAddr>; BATCH_MAX],
    /// The receiving thread's priority, kept within the CPU and rate budget before each block.
    scheduling: Option<crate::priority::Scheduling>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into the batch's own heap
// allocations (`bufs`, `names`, `controls`, `iovs`), which move with it and are touched only
// through `&mut self`.
unsafe impl Send for RecvBatch {}

const NAME_LEN: libc::socklen_t = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
const CONTROL_LEN: usize = size_of::<[u64; 16]>();

/// One datagram of a [`RecvBatch`].
pub(crate) struct Datagram<'a> {
    pub bytes: &'a [u8],
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    pub truncated: bool,
}

impl RecvBatch {
    /// Room for [`BATCH_MAX`] datagrams of up to `size` bytes.
    pub(crate) fn new(size: usize) -> RecvBatch {
        // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr values are valid; every
        // pointer is set below.
        let mut batch = RecvBatch {
            size,
            bufs: vec![0u8; size * BATCH_MAX],
            names: vec![unsafe { std::mem::zeroed() }; BATCH_MAX],
            controls: vec![[0u64; 16]; BATCH_MAX],
            iovs: Box::new(unsafe { std::mem::zeroed() }),
            hdrs: Box::new(unsafe { std::mem::zeroed() }),
            used: 0,
            lens: [(0, 0, 0); BATCH_MAX],
            dsts: [None; BATCH_MAX],
            scheduling: None,
        };
        let bufs = batch.bufs.as_mut_ptr();
        for i in 0..BATCH_MAX {
            // SAFETY: i * size + size <= bufs.len().
            batch.iovs[i].iov_base = unsafe { bufs.add(i * size) }.cast();
            batch.iovs[i].iov_len = size;
            let h = &mut batch.hdrs[i].msg_hdr;
            h.msg_name = (&mut batch.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = NAME_LEN;
            h.msg_iov = &mut batch.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = batch.controls[i].as_mut_ptr().cast();
            h.msg_controllen = CONTROL_LEN as _;
        }
        batch
    }

    /// Waits for a datagram on the blocking socket `fd`, then reads it and whatever else is
    /// queued, up to [`BATCH_MAX`] datagrams (MSG_WAITFORONE): how many were read, or the
    /// socket's pending error. After [`wake_receivers`] it returns at once, with zero-length
    /// datagrams.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // The kernel wrote the lengths (and flags) of the headers the last call filled.
        for m in &mut self.hdrs[..self.used] {
            m.msg_hdr.msg_namelen = NAME_LEN;
            m.msg_hdr.msg_controllen = CONTROL_LEN as _;
            m.msg_hdr.msg_flags = 0;
        }
        // Also the header after the last datagram: a receive that failed there may have
        // written to it.
        self.used = 1;
        // SAFETY: the headers describe BATCH_MAX valid, writable buffers of this batch, which
        // outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH_MAX as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        self.used = (n + 1).min(BATCH_MAX);
        for (i, m) in self.hdrs[..n].iter().enumerate() {
            let h = &m.msg_hdr;
            self.lens[i] = (m.msg_len as usize, h.msg_flags, h.msg_namelen);
            self.dsts[i] = original_dst(h);
        }
        Ok(n)
    }

    /// Runs the calling thread at realtime priority within the proxy's CPU and rate budget
    /// (see `priority.rs`), reported to before each block in [`RecvBatch::recv_until`];
    /// `None` or a refusal leaves it at normal priority.
    pub(crate) fn with_priority(
        mut self,
        realtime: Option<&std::sync::Arc<crate::priority::Realtime>>,
    ) -> RecvBatch {
        self.scheduling = realtime.and_then(crate::priority::Scheduling::start);
        self
    }

    /// The next batch of a receiving thread: [`RecvBatch::recv`], again when interrupted by a
    /// signal; `None` once `stopping` is set (read after every wake-up, see
    /// [`wake_receivers`]).
    pub(crate) fn recv_until(
        &mut self,
        fd: RawFd,
        stopping: &std::sync::atomic::AtomicBool,
    ) -> Option<io::Result<usize>> {
        if let Some(s) = &mut self.scheduling {
            s.before_block();
        }
        loop {
            let result = self.recv(fd);
            if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            match result {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => {
                    if let (Some(s), Ok(n)) = (&mut self.scheduling, &result) {
                        s.received(*n);
                    }
                    return Some(result);
                }
            }
        }
    }

    /// The bytes of datagram `i` of the last [`RecvBatch::recv`], to change in place.
    pub(crate) fn bytes_mut(&mut self, i: usize) -> &mut [u8] {
        let (len, ..) = self.lens[i];
        let start = i * self.size;
        &mut self.bufs[start..start + len.min(self.size)]
    }

    /// Datagram `i` of the last [`RecvBatch::recv`].
    pub(crate) fn get(&self, i: usize) -> Datagram<'_> {
        let (len, flags, namelen) = self.lens[i];
        let start = i * self.size;
        Datagram {
            bytes: &self.bufs[start..start + len.min(self.size)],
            src: storage_to_addr(&self.names[i], namelen),
            dst: self.dsts[i],
            truncated: flags & libc::MSG_TRUNC != 0,
        }
    }
}

/// An ICMP error queued on an IP_RECVERR socket: the destination the failed datagram was sent
/// to, the length of its payload copied into `buf` (our query, so its ID) and the errno it
/// stands for. `WouldBlock` when the queue is empty.
pub(crate) fn recv_error(fd: RawFd, buf: &mut [u8]) -> io::Result<(SocketAddr, usize, i32)> {
    let mut dst: MaybeUninit<libc::sockaddr_storage> = MaybeUninit::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 32];
    // SAFETY: a zeroed msghdr is valid; all pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dst.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 32]>() as _;
    // SAFETY: msg is fully initialised for recvmsg.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut errno = 0;
    // SAFETY: walking the control buffer the kernel filled.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let h = &*cmsg;
            if (h.cmsg_level == libc::SOL_IP && h.cmsg_type == libc::IP_RECVERR)
                || (h.cmsg_level == libc::SOL_IPV6 && h.cmsg_type == libc::IPV6_RECVERR)
            {
                let ee = std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err
                );
                errno = ee.ee_errno as i32;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // SAFETY: recvmsg wrote msg_namelen bytes of address.
    let addr = storage_to_addr(unsafe { dst.assume_init_ref() }, msg.msg_namelen)
        .ok_or_else(|| io::Error::other("ICMP error without the failed datagram's destination"))?;
    Ok((addr, n as usize, errno))
}

/// Writes `to` as the kernel reads socket addresses into `out` (room for either family):
/// the length written.
fn write_sockaddr(to: SocketAddr, out: &mut MaybeUninit<libc::sockaddr_in6>) -> libc::socklen_t {
    match to {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in is smaller than a sockaddr_in6 and no more aligned.
            unsafe { out.as_mut_ptr().cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            out.write(libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            });
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Sends `count` datagrams, the `i`th being `datagram(i)` (to its address, or on a connected
/// socket to its peer when `None`), with as few sendmmsg calls as it takes, without blocking.
/// Returns how many were sent, from the first: fewer than all when the socket's buffer filled
/// (the rest would block) or a datagram failed; the error then is that datagram's
/// (`WouldBlock` for a full buffer).
pub(crate) fn send_batch<'a>(
    fd: RawFd,
    count: usize,
    datagram: impl Fn(usize) -> (Option<SocketAddr>, &'a [u8]),
) -> (usize, Option<io::Error>) {
    // Everything on the stack, and only the headers in use are written: this runs once per
    // batch of replies or forwarded queries, often for a single datagram.
    let mut addrs = [const { MaybeUninit::<libc::sockaddr_in6>::uninit() }; BATCH_MAX];
    let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; BATCH_MAX];
    let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; BATCH_MAX];
    let mut sent = 0;
    while sent < count {
        let n = (count - sent).min(BATCH_MAX);
        for i in 0..n {
            let (to, bytes) = datagram(sent + i);
            let iov = iovs[i].write(libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            });
            // SAFETY: an all-zero msghdr is valid (no name, no control); the pointers are
            // set below.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            if let Some(to) = to {
                h.msg_namelen = write_sockaddr(to, &mut addrs[i]);
                h.msg_name = addrs[i].as_mut_ptr().cast();
            }
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            hdrs[i].write(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }
        // SAFETY: the first n headers are initialized above and describe datagrams whose
        // buffers and addresses outlive the call; the kernel only reads them (and writes
        // msg_len).
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return (sent, Some(io::Error::last_os_error()));
        }
        // Fewer than the chunk: the next datagram failed or would block, and the next call,
        // starting with it, says which.
        sent += r as usize;
    }
    (sent, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` with the calling thread pinned to `cpu`, then restores its affinity.
    fn on_cpu<R>(cpu: usize, f: impl FnOnce() -> R) -> R {
        // SAFETY: cpu_set_t is plain data; the calls get valid pointers and sizes.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut old);
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                0,
                "pin to CPU {cpu}"
            );
            let r = f();
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &old);
            r
        }
    }

    #[test]
    fn a_listener_group_is_steered_by_the_receiving_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = udp_listener(any, false).unwrap();
        let addr = first.local_addr().unwrap();
        let group: Vec<std::net::UdpSocket> = std::iter::once(first)
            .chain((1..cpus.min(4)).map(|_| udp_listener(addr, false).unwrap()))
            .collect();
        steer_by_cpu(&group[0], group.len() as u32).unwrap();
        let sender = std::net::UdpSocket::bind(any).unwrap();
        // Loopback delivers on the sending CPU: what CPU k sends, socket k mod n receives.
        for cpu in 0..cpus.min(4) {
            on_cpu(cpu, || sender.send_to(&[cpu as u8], addr).unwrap());
        }
        for cpu in 0..cpus.min(4) {
            let s = &group[cpu % group.len()];
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 8];
            let (n, _) = s.recv_from(&mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &[cpu as u8],
                "socket {cpu} got CPU {cpu}'s datagram"
            );
        }
    }
}
